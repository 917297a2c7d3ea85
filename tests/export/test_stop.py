"""The exporter at the node's stop: the association in hand is aborted, so a slow PACS does not
hold the stop up, and the record cut short stays pending, as it was, for the next start."""

import time
from dataclasses import replace
from pathlib import Path

from dicom_node.config import Destination
from dicom_node.export import DeliveryState, Exporter, Outbox
from tests.export.test_outbox import _results
from tests.export.test_slow_destination import SETTINGS, Running, SlowPeer, _wait


def test_an_abort_at_stop_ends_a_slow_store_at_once_and_leaves_the_record_pending(tmp_path: Path) -> None:
    peer = SlowPeer(delay=60)
    settings = replace(SETTINGS, timeout_seconds=30.0)  # the default: far longer than any grace
    exporter = Exporter(Outbox(tmp_path / "db.sqlite"), [Destination("slow", "SLOW", "127.0.0.1", peer.port)],
                        settings, "XAI_NODE")
    running = Running(exporter)
    try:
        [result] = _results(tmp_path, 1)
        exporter.outbox.enqueue(1, [result], ["slow"])
        _wait(lambda: peer.count(result.sop_instance_uid) == 1, timeout=30)
        started = time.monotonic()
        running.stop.set()
        assert exporter.abort() == 1
        for thread in running.threads:
            thread.join(timeout=5)
        took = time.monotonic() - started
        assert not any(t.is_alive() for t in running.threads) and took < 2, f"took {took:.1f} s"
        [record] = exporter.outbox.list()
        assert (record.state, record.sends, record.attempts, record.timeouts) == (DeliveryState.PENDING, 1, 0, 0)
        assert exporter.abort() == 0  # nothing left in hand
    finally:
        running.close(peer)

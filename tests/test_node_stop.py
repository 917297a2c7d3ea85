"""Stopping the node while its exporter waits on a slow PACS: the
association in hand is aborted, the stop ends within the grace and counts as clean (the store's
files are all in place), and the record cut short stays pending to go again on the next start."""

import time
from dataclasses import replace
from pathlib import Path

from dicom_node.config import (
    Destination,
    ExportSettings,
    InferenceSettings,
    ModelsSettings,
    WebSettings,
    WorkersSettings,
)
from dicom_node.export import DeliveryState
from dicom_node.node import Node
from tests.conftest import make_settings
from tests.export.test_outbox import _results
from tests.export.test_slow_destination import SlowPeer, _wait

GRACE = 4.0


def test_a_stop_during_a_slow_send_ends_within_the_grace_and_is_clean(tmp_path: Path) -> None:
    peer = SlowPeer(delay=60)  # a PACS that takes a minute per store; the node waits 30 s
    (tmp_path / "models").mkdir()
    settings = replace(
        make_settings(tmp_path / "data"),
        models=ModelsSettings(dir=tmp_path / "models"), web=WebSettings(enabled=False),
        inference=InferenceSettings(device="cpu"),
        workers=WorkersSettings(count=1, shutdown_grace_seconds=GRACE),
        export=ExportSettings(timeout_seconds=30, poll_seconds=0.1),
        destinations=(Destination("pacs", "SLOW", "127.0.0.1", peer.port),))
    node = Node(settings)
    try:
        node.start()
        [result] = _results(tmp_path, 1)
        node.outbox.enqueue(1, [result], ["pacs"])
        _wait(lambda: peer.count(result.sop_instance_uid) == 1, timeout=30)
        started = time.monotonic()
        node.stop()
        took = time.monotonic() - started
    finally:
        peer.stop()
    assert took < GRACE, f"the stop took {took:.1f} s"
    assert (settings.node.data_dir / "clean-shutdown").exists()  # no scan of every file next start
    node = Node(settings)
    node.start()
    try:
        [record] = node.outbox.list()
        assert record.state == DeliveryState.PENDING and record.sends == 1 and record.attempts == 0
    finally:
        node.stop()

"""A node killed with SIGKILL while a result is on the wire to a (slow) PACS: the result is sent
again after the restart, and the outbox counts every send, the lost one included."""

import signal
import threading
from pathlib import Path

import pytest

from dicom_node.phantoms import write_study
from tests.export.test_slow_destination import SlowPeer
from tests.jobs.test_crash import wait_for
from tests.nodeproc import NodeProcess, pacs_config
from tests.peers.test_dcmtk import run_storescu
from tests.peers.test_orthanc_e2e import node_rows

pytestmark = pytest.mark.peers

EXPORT = "backoff_seconds = 0.3\nmax_backoff_seconds = 1\npoll_seconds = 0.2\ntimeout_seconds = 10"


def test_a_node_killed_mid_send_sends_that_result_again_and_counts_both_sends(tmp_path: Path) -> None:
    in_flight = threading.Event()
    pacs = SlowPeer(delay=1.0, on_store=lambda uid: in_flight.set())  # 1 s per store, well within 10 s
    try:
        node = NodeProcess(tmp_path / "node")
        node.config.write_text(node.config.read_text() + pacs_config(pacs.port, pacs_aet="SLOW", export=EXPORT))
        study = write_study(tmp_path / "cr", 1, seed=3_000_002, size=256, modality="CR",
                            findings={"nodule": True, "effusion": True})
        with node:
            run_storescu(node.port, [], study)
            assert in_flight.wait(timeout=120), "no result reached the PACS"
            node.stop(signal.SIGKILL)  # while the PACS holds the first store for a second
        cut_short = pacs.received[0]
        with NodeProcess(tmp_path / "node") as again:
            wait_for(lambda: {s for (s,) in node_rows(again, "SELECT state FROM outbox")} == {"delivered"},
                     timeout=120, what="delivery after the restart")
            sends = dict(node_rows(again, "SELECT sop_instance_uid, sends FROM outbox"))
    finally:
        pacs.stop()
    assert len(sends) >= 2  # an SC and an SR at least
    assert sends == {uid: pacs.count(uid) for uid in sends}  # every request the PACS saw is counted
    assert sends[cut_short] == 2  # the one on the wire at the kill, and again after the restart
    resent = sorted(uid for uid, n in sends.items() if n > 1)
    print(f"kill -9 mid-export: {len(resent)} of {len(sends)} results sent twice")

"""Deliberate 60 s attack tests: the node cannot be locked out, and stops on time, under attack.

Attack (tests/ingest/hostile.py), all at once for 60 s with the default [ingest] limits:
- 4 empty connections a second from 127.0.0.3 (half closed at once, half silent until dropped);
- 16 slow tricklers from 127.0.0.2: an A-ASSOCIATE-RQ header, then one byte every 2 s,
  reconnecting whenever the node cuts them off.
Meanwhile a good peer on 127.0.0.1 opens one association for a C-ECHO and another for a C-STORE
every second. At least 95 % of each must succeed. A second run (20 s) puts the attackers on the
good peer's own address. A third sends SIGTERM to a `dicom-node serve` under attack. About
60 + 20 + 17 s in all, on 2 cores.
"""

import logging
import signal
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.ingest.scp import start_ingest
from dicom_node.store import InstanceStore
from tests.conftest import make_settings
from tests.factories import ct_dataset
from tests.ingest.hostile import Attack, stalled_association
from tests.nodeproc import NodeProcess

ATTACK_SECONDS = 60
pytestmark = pytest.mark.attack


def good_peer() -> AE:
    ae = AE(ae_title="GOOD_SCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def echo_once(ae: AE, port: int) -> bool:
    assoc = ae.associate("127.0.0.1", port, ae_title="XAI_NODE", bind_address=("127.0.0.1", 0))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return getattr(status, "Status", None) == 0


def store_once(ae: AE, port: int, seed: int) -> bool:
    assoc = ae.associate("127.0.0.1", port, ae_title="XAI_NODE", bind_address=("127.0.0.1", 0))
    if not assoc.is_established:
        return False
    status = assoc.send_c_store(ct_dataset(seed=seed))
    assoc.release()
    return getattr(status, "Status", None) == 0


def timed(call: Callable[[], bool]) -> tuple[bool, float]:
    start = time.monotonic()
    return call(), time.monotonic() - start


def attacked_good_peer(tmp_path: Path, attack: Attack, seconds: int,
                       caplog: pytest.LogCaptureFixture) -> None:
    """Run ``attack`` against a node with the default [ingest] limits for ``seconds`` while
    the good peer makes a C-ECHO and a C-STORE a second; check what the module docstring says."""
    caplog.set_level(logging.WARNING, logger="dicom_node")
    settings = make_settings(tmp_path / "data")
    store = InstanceStore(settings.node.data_dir)
    server = start_ingest(settings, store)
    attack.port = server.port
    attack.start()
    ae = good_peer()
    echoes: list[tuple[bool, float]] = []
    stores: list[tuple[bool, float]] = []
    try:
        start = time.monotonic()
        for i in range(seconds):
            pause = start + i - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # a fixed cadence, not a wait for a condition
            if time.monotonic() > start + seconds + 15:
                break  # hopelessly behind: the rest count as failures
            echoes.append(timed(partial(echo_once, ae, server.port)))
            stores.append(timed(partial(store_once, ae, server.port, i)))
    finally:
        counts = attack.stop()
        server.stop(grace_seconds=2.0)
        store.close()
    ok_echo = sum(ok for ok, _ in echoes)
    ok_store = sum(ok for ok, _ in stores)
    latencies = [t for _, t in echoes + stores]
    print(f"\nC-ECHO {ok_echo}/{seconds}, C-STORE {ok_store}/{seconds}; association + "
          f"operation median {statistics.median(latencies) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms; attack: {counts}")
    assert ok_echo >= 0.95 * seconds and ok_store >= 0.95 * seconds
    # The attack really ran, and the node cut the tricklers off.
    assert counts.empty_connects >= 3 * seconds
    assert counts.trickle_cut >= 16 * (seconds // 10)
    # Each attacking host logged at most 10 lines a minute, plus one "suppressed" line.
    for host in {attack.trickle_source, attack.empty_source}:
        lines = [r for r in caplog.records if host in r.getMessage()]
        assert len(lines) <= (seconds // 60 + 1) * (10 + 1), (host, len(lines))


def test_a_good_peer_is_served_during_an_attack(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The attackers on other hosts (127.0.0.2, 127.0.0.3): 60 s."""
    attacked_good_peer(tmp_path, Attack(0), ATTACK_SECONDS, caplog)


def test_a_good_peer_is_served_during_an_attack_from_its_own_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The attackers behind the good peer's own address (a shared NAT): 20 s. The host's
    connection limit is then full of tricklers, and the good peer's connections evict them."""
    attack = Attack(0, trickle_source="127.0.0.1", empty_source="127.0.0.1")
    attacked_good_peer(tmp_path, attack, 20, caplog)


def test_sigterm_during_an_attack_stops_the_node_within_its_grace(tmp_path: Path) -> None:
    grace = 3.0
    with NodeProcess(tmp_path / "node", grace=grace) as node:
        attack = Attack(node.port).start()
        stalled = []
        try:
            time.sleep(6)  # let the tricklers settle into their cycle; a fixed scenario
            stalled = [stalled_association(node.port, "127.0.0.4") for _ in range(3)]
            start = time.monotonic()
            code = node.stop(signal.SIGTERM, timeout=grace + 30)
            took = time.monotonic() - start
        finally:
            attack.stop()
            for sock in stalled:
                sock.close()
    print(f"\nSIGTERM to exit under attack: {took:.2f} s (grace {grace} s)")
    assert code == 0
    assert took <= grace + 2.0, f"the node took {took:.2f} s to stop"

"""A PACS slower than the timeout, and a healthy destination beside it, with the exporter's
threads running as in ``serve`` (real time, in-process SCPs on free ports).

Times are scaled down from the field report (a PACS taking 40 s per store against a 30 s
timeout): here a store takes 4 s against a 1 s timeout.
"""

import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from dicom_node.config import Destination, ExportSettings
from dicom_node.export import DeliveryState, Exporter, Outbox, OutboxRecord
from dicom_node.store.db import connect, migrate
from tests.export.test_outbox import Peer, _results

SETTINGS = ExportSettings(max_attempts=3, backoff_seconds=0.2, max_backoff_seconds=0.5, timeout_seconds=1.0,
                          poll_seconds=0.1, max_unconfirmed=3)


class SlowPeer:
    """A storage SCP whose C-STORE handler takes ``delay`` seconds: for every store, or for the
    first ``slow[uid]`` stores of an instance. ``received`` lists every request as it arrives."""

    def __init__(self, delay: float, slow: dict[str, int] | None = None,
                 on_store: Callable[[str], None] | None = None) -> None:
        self.delay = delay
        self.slow = slow
        self.on_store = on_store
        self.received: list[str] = []
        self._lock = threading.Lock()
        self._release = threading.Event()  # ends every pending sleep at teardown
        self.ae = AE(ae_title="SLOW")
        self.ae.supported_contexts = StoragePresentationContexts  # whatever the node makes
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]
        self.stopped = False

    def _store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.received.append(uid)
            slow = self.slow is None or self.received.count(uid) <= self.slow.get(uid, 0)
        if self.on_store is not None:
            self.on_store(uid)
        if slow:
            self._release.wait(self.delay)
        return 0x0000

    def count(self, uid: str) -> int:
        with self._lock:
            return self.received.count(uid)

    def stop(self) -> None:
        self._release.set()
        if not self.stopped:
            self.server.shutdown()
            self.stopped = True


@pytest.fixture
def peers() -> Iterator[list[SlowPeer | Peer]]:
    started: list[SlowPeer | Peer] = []
    yield started
    for peer in started:
        peer.stop()


class Running:
    """The exporter's destination threads, as ``serve`` starts them."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter
        self.stop = threading.Event()
        self.workers = exporter.workers()
        self.threads = [threading.Thread(target=w.run_until, args=(self.stop,), daemon=True) for w in self.workers]
        exporter.outbox.on_enqueue = self.wake
        for thread in self.threads:
            thread.start()

    def wake(self, names: object) -> None:
        for worker in self.workers:
            worker.wake()

    def close(self, *peers: SlowPeer | Peer) -> None:
        self.stop.set()
        for peer in peers:
            peer.stop()  # a slow peer answers at once: no thread waits out its timeout
        for thread in self.threads:
            thread.join(timeout=10)
        assert not any(t.is_alive() for t in self.threads)
        self.exporter.outbox.close()


def _exporter(db: Path, destinations: list[Destination]) -> Exporter:
    return Exporter(Outbox(db), destinations, SETTINGS, "XAI_NODE")


def _wait(condition: Callable[[], bool], timeout: float) -> float:
    """Poll ``condition`` until it holds; returns the seconds it took (fails after ``timeout``)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - started


def _states(outbox: Outbox, destination: str) -> set[str]:
    return {r.state for r in outbox.list(limit=1000) if r.destination == destination}


def _by_uid(outbox: Outbox) -> dict[str, OutboxRecord]:
    return {r.sop_instance_uid: r for r in outbox.list(limit=1000)}


def test_a_pacs_slower_than_the_timeout_gets_each_result_three_times_then_it_is_unconfirmed(
        tmp_path: Path, peers: list) -> None:
    slow = SlowPeer(delay=4.0)  # 40 s per store against a 30 s timeout, scaled down by ten
    peers.append(slow)
    exporter = _exporter(tmp_path / "db.sqlite", [Destination("slow", "SLOW", "127.0.0.1", slow.port)])
    first, second = _results(tmp_path, 2)
    running = Running(exporter)
    exporter.outbox.enqueue(1, [first, second], ["slow"])
    _wait(lambda: set(exporter.outbox.counts()) == {DeliveryState.UNCONFIRMED}, timeout=30)
    running.close()
    records = _by_uid(Outbox(tmp_path / "db.sqlite"))
    for result in (first, second):
        record = records[result.sop_instance_uid]
        assert record.state == DeliveryState.UNCONFIRMED and "no response" in record.reason
        assert record.sends == record.timeouts == 3 == slow.count(result.sop_instance_uid)
    # the second record went out before the first one's second try: it did not starve behind it
    assert slow.received[:2] == [first.sop_instance_uid, second.sop_instance_uid]


def test_an_unconfirmed_record_is_not_sent_again_until_an_operator_retries_it(tmp_path: Path, peers: list) -> None:
    slow = SlowPeer(delay=4.0)
    peers.append(slow)
    exporter = _exporter(tmp_path / "db.sqlite", [Destination("slow", "SLOW", "127.0.0.1", slow.port)])
    [result] = _results(tmp_path, 1)
    exporter.outbox.enqueue(1, [result], ["slow"])
    for _ in range(3):
        _wait(lambda: bool(exporter.outbox.due()), timeout=5)  # its backoff passes
        assert exporter.send_due() == 0
    [record] = exporter.outbox.list()
    assert record.state == DeliveryState.UNCONFIRMED and slow.count(result.sop_instance_uid) == 3
    assert exporter.send_due() == 0 and slow.count(result.sop_instance_uid) == 3
    slow.slow = {}  # the PACS recovers; the operator sends it again
    retried = exporter.outbox.retry(record.id)
    assert retried.state == DeliveryState.PENDING and retried.timeouts == 0 and retried.sends == 3
    assert exporter.send_due() == 1
    [record] = exporter.outbox.list()
    assert record.state == DeliveryState.DELIVERED and record.sends == 4 == slow.count(result.sop_instance_uid)


def test_a_slow_record_answered_in_time_at_last_is_delivered_and_the_next_one_does_not_wait(
        tmp_path: Path, peers: list) -> None:
    first, second, third = _results(tmp_path, 3)
    slow = SlowPeer(delay=4.0, slow={first.sop_instance_uid: 2})  # slow twice, then in time
    peers.append(slow)
    exporter = _exporter(tmp_path / "db.sqlite", [Destination("slow", "SLOW", "127.0.0.1", slow.port)])
    running = Running(exporter)
    started = time.time()
    exporter.outbox.enqueue(1, [first, second, third], ["slow"])
    _wait(lambda: exporter.outbox.counts() == {DeliveryState.DELIVERED: 3}, timeout=30)
    running.close()
    records = _by_uid(Outbox(tmp_path / "db.sqlite"))
    assert records[first.sop_instance_uid].sends == 3 == slow.count(first.sop_instance_uid)
    for later in (second, third):  # sent on a new association right after the first timed out
        assert records[later.sop_instance_uid].sends == 1
        # not held behind the first's retries (backoff, second timeout, third send): delivered
        # before it. An order, not a wall-clock bound, so a loaded machine cannot fail it.
        assert started < records[later.sop_instance_uid].delivered_at < records[first.sop_instance_uid].delivered_at


def test_a_healthy_destination_is_not_delayed_by_a_slow_one(tmp_path: Path, peers: list) -> None:
    results = _results(tmp_path, 20)
    healthy = Peer()
    # 10 s per store against its own 5 s timeout: an exporter serving both in turn would hold the
    # healthy destination's results back by at least 5 s
    slow = SlowPeer(delay=10.0)
    peers.extend([healthy, slow])
    fast_destination = Destination("fast", "PACS", "127.0.0.1", healthy.port)
    slow_destination = Destination("slow", "SLOW", "127.0.0.1", slow.port, timeout_seconds=5.0)
    seconds = {}
    for case, destinations in (("alone", [fast_destination]), ("beside", [slow_destination, fast_destination])):
        healthy.received.clear()
        (tmp_path / case).mkdir()
        exporter = _exporter(tmp_path / case / "db.sqlite", destinations)
        running = Running(exporter)
        exporter.outbox.enqueue(1, results, [d.name for d in destinations])
        seconds[case] = _wait(lambda: len(set(healthy.received)) == len(results), timeout=30)
        outbox = exporter.outbox
        _wait(lambda: outbox.counts().get(DeliveryState.DELIVERED) == len(results), timeout=5)  # noqa: B023
        if case == "beside":  # the slow destination was busy all along, and has nothing yet
            assert slow.received and DeliveryState.DELIVERED not in _states(exporter.outbox, "slow")
        running.close(*([slow] if case == "beside" else []))
    print(f"healthy destination, 20 results: alone {seconds['alone']:.2f} s, "
          f"beside a slow one {seconds['beside']:.2f} s")
    assert abs(seconds["beside"] - seconds["alone"]) < 2.0


def test_sends_are_counted_before_the_request_goes_out(tmp_path: Path, peers: list) -> None:
    seen: list[int] = []
    db = tmp_path / "db.sqlite"

    def look(uid: str) -> None:  # what a crash at this instant would leave in the outbox
        reader = Outbox(db)
        seen.append(_by_uid(reader)[uid].sends)
        reader.close()

    peer = SlowPeer(delay=0.0, slow={}, on_store=look)
    peers.append(peer)
    exporter = _exporter(db, [Destination("pacs", "SLOW", "127.0.0.1", peer.port)])
    exporter.outbox.enqueue(1, _results(tmp_path, 2), ["pacs"])
    assert exporter.send_due() == 2
    assert seen == [1, 1]
    assert {r.sends for r in exporter.outbox.list()} == {1}


def test_destination_timeouts_override_the_export_ones(tmp_path: Path) -> None:
    exporter = _exporter(tmp_path / "db.sqlite", [])
    plain = Destination("a", "A", "127.0.0.1", 104)
    own = replace(plain, timeout_seconds=7.0, connect_timeout_seconds=2.0)
    cases = ((plain, 1.0, 1.0), (replace(plain, timeout_seconds=7.0), 7.0, 7.0), (own, 7.0, 2.0))
    for destination, timeout, connect_timeout in cases:
        ae = exporter._ae(destination, [str(SecondaryCaptureImageStorage)])
        assert (ae.dimse_timeout, ae.network_timeout) == (timeout, timeout)
        assert (ae.acse_timeout, ae.connection_timeout) == (connect_timeout, connect_timeout)
    exporter.outbox.close()


def test_an_outbox_of_the_old_schema_opens_and_gains_the_new_columns(tmp_path: Path) -> None:
    from dicom_node.export.outbox import _MIGRATIONS

    db = tmp_path / "db.sqlite"
    conn = connect(db)
    migrate(conn, "outbox", _MIGRATIONS[:1])  # the table as the previous release made it
    conn.execute("INSERT INTO outbox (sop_instance_uid, destination, sop_class_uid, study_instance_uid, path, "
                 "job_id, state, attempts, not_before, reason, created_at, updated_at) "
                 "VALUES ('1.2.3', 'pacs', '1.2', '1.2.4', '/x.dcm', 1, 'dead', 5, 0, 'why', 1, 2)")
    conn.close()
    outbox = Outbox(db)
    [record] = outbox.list()
    assert (record.state, record.attempts, record.reason, record.sends, record.timeouts) == (
        DeliveryState.DEAD, 5, "why", 0, 0)
    outbox.close()
    conn = sqlite3.connect(db)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    version = conn.execute("SELECT version FROM schema_versions WHERE component = 'outbox'").fetchone()
    conn.close()
    assert {"sends", "timeouts"} <= columns and version == (len(_MIGRATIONS),)


def test_a_destination_that_never_answers_the_association_is_retried_and_nothing_counts_as_sent(
        tmp_path: Path) -> None:
    with socket.socket() as silent:  # the kernel completes the TCP handshake; nobody ever reads
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        destination = Destination("silent", "SILENT", "127.0.0.1", port, connect_timeout_seconds=0.5)
        exporter = Exporter(Outbox(tmp_path / "db.sqlite"), [destination], replace(SETTINGS, timeout_seconds=5.0),
                            "XAI_NODE")
        exporter.outbox.enqueue(1, _results(tmp_path, 2), ["silent"])
        started = time.monotonic()
        assert exporter.send_due() == 0
        took = time.monotonic() - started
    assert took < 3  # its connect timeout (0.5 s), once for both records; not the 5 s timeout
    for record in exporter.outbox.list():
        assert record.state == DeliveryState.PENDING and record.attempts == 1
        assert (record.sends, record.timeouts) == (0, 0) and "no association" in record.reason
    exporter.outbox.close()

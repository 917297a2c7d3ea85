"""The SCP's front end: the handshake deadline, admission in the accept loop, and a stop that
never waits on a peer. Real sockets on loopback; attackers on their own loopback addresses."""

import contextlib
import gc
import logging
import select
import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.ingest.limits import ASSOCIATE_PDU_LIMIT
from dicom_node.ingest.scp import TRANSFER_SYNTAXES, IngestServer, start_ingest
from dicom_node.ingest.transport import DropReason, read_request, tls_handshake
from dicom_node.store import InstanceStore
from tests.conftest import make_settings
from tests.ingest.hostile import associate_rq, closed_by_peer, connect, stalled_association


@contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server side) of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
    try:
        yield client, server_side
    finally:
        client.close()
        server_side.close()


def timed_read(sock: socket.socket, timeout: float) -> tuple[bytearray | DropReason, float, float]:
    """read_request in this thread: (result, wall seconds, CPU seconds of this thread)."""
    start, cpu = time.monotonic(), time.thread_time()
    result = read_request(sock, timeout)
    return result, time.monotonic() - start, time.thread_time() - cpu


def later(delay: float, action: object) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), action()))  # type: ignore[operator]
    thread.start()
    return thread


def test_a_whole_request_is_read_and_nothing_after_it() -> None:
    rq = associate_rq()
    with tcp_pair() as (client, server_side):
        client.sendall(rq + b"\x04trailing")
        result, wall, _ = timed_read(server_side, 5.0)
        assert result == rq and wall < 1.0
        assert server_side.recv(100) == b"\x04trailing"  # left for pynetdicom


def test_a_request_in_pieces_is_awaited() -> None:
    rq = associate_rq()
    with tcp_pair() as (client, server_side):
        client.sendall(rq[:3])
        sender = later(0.2, lambda: client.sendall(rq[3:40]))
        final = later(0.4, lambda: client.sendall(rq[40:]))
        result, wall, _ = timed_read(server_side, 5.0)
        sender.join()
        final.join()
        assert result == rq and 0.3 < wall < 2.0


def test_a_trickler_is_dropped_at_the_deadline_and_costs_no_cpu_meanwhile() -> None:
    with tcp_pair() as (client, server_side):
        client.sendall(struct.pack(">BBL", 1, 0, 500))
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.1):
                client.send(b"\x00")

        thread = threading.Thread(target=trickle)
        thread.start()
        try:
            result, wall, cpu = timed_read(server_side, 1.5)
        finally:
            stop.set()
            thread.join()
    assert result is DropReason.TIMEOUT
    assert 1.4 < wall < 2.5  # one deadline for the whole request, not per byte
    assert cpu < 0.1, f"the wait used {cpu:.3f} s of CPU"


def test_silence_times_out() -> None:
    with tcp_pair() as (_, server_side):
        result, wall, _ = timed_read(server_side, 0.5)
    assert result is DropReason.TIMEOUT and 0.4 < wall < 1.5


@pytest.mark.parametrize(("data", "reason"), [
    (b"", DropReason.SILENT),
    (b"\x01\x00\x00", DropReason.CLOSED),
    (b"\x01\x00\x00\x00\x00\xc8partial", DropReason.CLOSED),
])
def test_a_peer_that_closes_is_dropped_at_once(data: bytes, reason: DropReason) -> None:
    with tcp_pair() as (client, server_side):
        client.sendall(data)
        client.close()
        result, wall, cpu = timed_read(server_side, 5.0)
    assert result is reason and wall < 1.0 and cpu < 0.1


def test_a_reset_is_dropped_at_once() -> None:
    with tcp_pair() as (client, server_side):
        client.sendall(b"\x01\x00")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        result, wall, _ = timed_read(server_side, 5.0)
    assert result is DropReason.CLOSED and wall < 1.0


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01",
                                  struct.pack(">BBL", 0x04, 0, 10)])
def test_anything_but_an_a_associate_rq_is_dropped(data: bytes) -> None:
    with tcp_pair() as (client, server_side):
        client.sendall(data)
        assert read_request(server_side, 5.0) is DropReason.NOT_A_REQUEST


def test_a_request_of_the_maximum_length_is_read() -> None:
    pdu = struct.pack(">BBL", 0x01, 0, ASSOCIATE_PDU_LIMIT) + bytes(ASSOCIATE_PDU_LIMIT)
    with tcp_pair() as (client, server_side):
        sender = threading.Thread(target=client.sendall, args=(pdu,))
        sender.start()
        result, wall, _ = timed_read(server_side, 10.0)
        sender.join(timeout=5)
        assert result == pdu and wall < 5.0
        assert not sender.is_alive()


def test_an_overlong_request_is_dropped_before_it_is_read() -> None:
    with tcp_pair() as (client, server_side):
        client.sendall(struct.pack(">BBL", 0x01, 0, ASSOCIATE_PDU_LIMIT + 1))
        assert read_request(server_side, 5.0) is DropReason.TOO_LONG


# --- the server ----------------------------------------------------------------------------


@contextmanager
def running(tmp_path: Path, **ingest: object) -> Iterator[IngestServer]:
    settings = make_settings(tmp_path / "data", **ingest)
    store = InstanceStore(settings.node.data_dir)
    server = start_ingest(settings, store)
    try:
        yield server
    finally:
        server.stop(grace_seconds=1.0)
        store.close()


def echo(port: int, source: str = "127.0.0.1", contexts: int = 1) -> bool:
    ae = AE(ae_title="GOOD_SCU")
    ae.add_requested_context(Verification)
    for context in AllStoragePresentationContexts[: contexts - 1]:
        assert context.abstract_syntax is not None
        ae.add_requested_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="XAI_NODE", bind_address=(source, 0))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return getattr(status, "Status", None) == 0


def wait_closed(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the node closed ``sock``, or None if it did not within ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if closed_by_peer(sock):
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def connect_kept(port: int, source: str, within: float = 5.0) -> bool:
    """Whether a connection from ``source`` is kept open (not refused) within ``within`` s.

    The node frees a place once its thread has seen the peer's close, so this retries.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock = connect(port, source)
        kept = wait_closed(sock, 0.3) is None
        sock.close()
        if kept:
            return True
    return False


def test_a_silent_connection_is_closed_after_the_handshake_timeout(tmp_path: Path) -> None:
    with running(tmp_path, handshake_timeout=0.5) as server:
        sock = connect(server.port, "127.0.0.2")
        sock.sendall(b"\x01\x00")
        waited = wait_closed(sock, 5.0)
        sock.close()
        assert waited is not None and 0.4 < waited < 2.0
        assert echo(server.port)


def test_the_largest_request_pynetdicom_can_make_passes(tmp_path: Path) -> None:
    """128 presentation contexts of 13 transfer syntaxes each, in one A-ASSOCIATE-RQ."""
    with running(tmp_path) as server:
        assert echo(server.port, contexts=128)


def test_over_the_per_host_limit_connections_are_closed_at_once(tmp_path: Path) -> None:
    with running(tmp_path, max_connections_per_host=2) as server:
        held = [stalled_association(server.port, "127.0.0.4") for _ in range(2)]
        extra = connect(server.port, "127.0.0.4")
        waited = wait_closed(extra, 3.0)
        assert waited is not None and waited < 1.0  # nothing to evict: both are associations
        assert not any(closed_by_peer(s) for s in held)
        assert echo(server.port)  # another host is not affected
        held[0].close()
        assert connect_kept(server.port, "127.0.0.4")  # a freed place can be taken again
        for s in (*held, extra):
            s.close()


def test_a_good_peer_behind_a_slow_one_evicts_its_oldest_handshake(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same address as a trickler: a full host makes room by dropping its slowest handshake."""
    caplog.set_level(logging.WARNING, logger="dicom_node")
    with running(tmp_path, max_connections_per_host=3, handshake_timeout=30.0) as server:
        held = [connect(server.port, "127.0.0.1") for _ in range(3)]
        for sock in held:
            sock.sendall(struct.pack(">BBL", 1, 0, 500))
        assert echo(server.port, "127.0.0.1")
        assert wait_closed(held[0], 2.0) is not None  # the oldest made room
        assert wait_closed(held[2], 0.2) is None  # the youngest was kept
        for sock in held:
            sock.close()
    assert any(DropReason.EVICTED.value in r.getMessage() for r in caplog.records)


def test_a_full_pool_evicts_only_handshakes_older_than_evict_after(tmp_path: Path) -> None:
    with running(tmp_path, max_handshakes=2, handshake_timeout=30.0,
                 handshake_evict_after=1.5) as server:
        held = [connect(server.port, f"127.0.0.{2 + i}") for i in range(2)]
        early = connect(server.port, "127.0.0.9")
        waited = wait_closed(early, 3.0)
        assert waited is not None and waited < 1.0  # both are younger than 1.5 s: refused
        time.sleep(1.6)  # the scenario: now both are older than handshake_evict_after
        assert echo(server.port)  # evicts the oldest, held[0]
        assert wait_closed(held[0], 2.0) is not None
        assert wait_closed(held[1], 0.2) is None
        for s in (*held, early):
            s.close()


def test_over_the_per_host_rate_connections_are_closed_at_once(tmp_path: Path) -> None:
    with running(tmp_path, connects_per_host_per_minute=5, handshake_timeout=10.0) as server:
        for _ in range(5):
            connect(server.port, "127.0.0.3").close()
        extra = connect(server.port, "127.0.0.3")
        waited = wait_closed(extra, 3.0)
        extra.close()
        assert waited is not None and waited < 1.0
        assert echo(server.port)


def test_peers_in_the_handshake_hold_no_association_slot(tmp_path: Path) -> None:
    with running(tmp_path, max_associations=1, handshake_timeout=10.0, handshake_evict_after=60.0) as server:
        silent = [connect(server.port, "127.0.0.2") for _ in range(5)]
        assert echo(server.port)  # five half-open connections, yet the one slot is free
        stalled = stalled_association(server.port, "127.0.0.4")  # now the slot is taken
        assert not echo(server.port)  # rejected: local limit exceeded
        for s in (*silent, stalled):
            s.close()


def test_handshakes_are_bounded_apart(tmp_path: Path) -> None:
    with running(tmp_path, max_handshakes=3, handshake_timeout=10.0, handshake_evict_after=60.0) as server:
        silent = [connect(server.port, f"127.0.0.{2 + i}") for i in range(3)]
        extra = connect(server.port, "127.0.0.9")
        waited = wait_closed(extra, 3.0)
        assert waited is not None and waited < 1.0
        silent[0].close()
        assert connect_kept(server.port, "127.0.0.9")
        deadline = time.monotonic() + 5
        while not echo(server.port):  # the probe's place is freed once the node saw its close
            assert time.monotonic() < deadline
        for s in (*silent, extra):
            s.close()


def test_junk_connections_log_a_bounded_number_of_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node")
    with running(tmp_path, log_lines_per_host_per_minute=3, handshake_timeout=0.3) as server:
        for _ in range(20):
            sock = connect(server.port, "127.0.0.5")
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            wait_closed(sock, 3.0)
            sock.close()
        assert echo(server.port)
    about_junk = [r for r in caplog.records if "127.0.0.5" in r.getMessage()]
    assert len(about_junk) == 3, [r.getMessage() for r in about_junk]
    assert all(DropReason.NOT_A_REQUEST.value in r.getMessage() for r in about_junk)


def test_rejections_are_rate_limited_per_host(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node")
    with running(tmp_path, log_lines_per_host_per_minute=2) as server:
        for _ in range(6):
            sock = connect(server.port, "127.0.0.6")
            sock.sendall(associate_rq(called="WRONG_AET"))
            wait_closed(sock, 5.0)
            sock.close()
    rejected = [r for r in caplog.records if "rejected association" in r.getMessage()]
    assert len(rejected) == 2


def test_stop_cuts_handshakes_and_stalled_associations_within_the_grace(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", handshake_timeout=30.0)
    store = InstanceStore(settings.node.data_dir)
    server = start_ingest(settings, store)
    tricklers = [connect(server.port, "127.0.0.2") for _ in range(8)]
    for sock in tricklers:
        sock.sendall(struct.pack(">BBL", 1, 0, 500))
    stalled = [stalled_association(server.port, "127.0.0.4") for _ in range(3)]
    start = time.monotonic()
    server.stop(grace_seconds=1.0)
    took = time.monotonic() - start
    store.close()
    assert took < 1.0 + 1.5, f"stop took {took:.2f} s"
    assert not server.server.active_associations
    assert server.server.open_connections() == 0
    assert all(wait_closed(s, 2.0) is not None for s in (*tricklers, *stalled))
    for s in (*tricklers, *stalled):
        s.close()


def test_explicit_vr_peer_still_stores_through_the_new_front_end(tmp_path: Path) -> None:
    from tests.factories import ct_dataset
    from tests.ingest.test_scp import send

    with running(tmp_path) as server:
        results = send(server.port, ct_dataset(), contexts=[
            (ds_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            for ds_class in ["1.2.840.10008.5.1.4.1.1.2"]])
    assert results == [(0, "")]


def test_finished_associations_are_reclaimed(tmp_path: Path) -> None:
    """The accept loop no longer forces a full collection; finished associations are plain
    garbage (cycles at worst) that Python's own collector reclaims."""
    import gc
    import weakref

    from pynetdicom import evt

    seen: list[weakref.ref[object]] = []
    with running(tmp_path) as server:
        server.server.bind(evt.EVT_ACCEPTED, lambda event: seen.append(weakref.ref(event.assoc)))
        for _ in range(5):
            assert echo(server.port)
        deadline = time.monotonic() + 5
        while server.server.active_associations:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    gc.collect()
    assert len(seen) == 5 and all(ref() is None for ref in seen)


def test_stop_says_when_a_handler_outlived_the_abort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler stuck outside the network (a slow disk) is not waited for: the stop returns on
    time and reports itself unclean, so the next start checks the files against the index."""
    from tests.factories import ct_dataset
    from tests.ingest.test_scp import send

    settings = make_settings(tmp_path / "data")
    store = InstanceStore(settings.node.data_dir)
    release, entered = threading.Event(), threading.Event()
    real_stage = store.stage

    def slow_stage(*args: object, **kwargs: object) -> object:
        entered.set()
        release.wait(10)
        return real_stage(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "stage", slow_stage)
    server = start_ingest(settings, store)
    def send_aborted() -> None:
        with contextlib.suppress(Exception):  # the association is aborted under it
            send(server.port, ct_dataset())

    sender = threading.Thread(target=send_aborted, daemon=True)
    sender.start()
    try:
        assert entered.wait(10)
        start = time.monotonic()
        clean = server.stop(grace_seconds=0.2)
        took = time.monotonic() - start
        assert clean is False and took < 0.2 + 1.5
    finally:
        release.set()
        sender.join(timeout=15)
        deadline = time.monotonic() + 10
        while server.server.active_associations and time.monotonic() < deadline:
            time.sleep(0.01)
        store.close()
    assert not server.server.active_associations  # it ended once its handler returned


def test_a_clean_stop_says_so(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    store = InstanceStore(settings.node.data_dir)
    server = start_ingest(settings, store)
    assert echo(server.port)
    assert server.stop(grace_seconds=1.0) is True
    store.close()


def test_a_handshake_ending_during_its_eviction_is_still_shut(tmp_path: Path) -> None:
    """The victim's handshake ends between admission's choice and the lookup of its socket.

    Admission has already stopped counting the victim; unless its socket is shut, it would live
    on uncounted. The interleaving is forced: the eviction waits for the victim's thread.
    """
    with running(tmp_path, max_connections_per_host=1, handshake_timeout=30.0) as ingest:
        server = ingest.server
        victim = connect(ingest.port, "127.0.0.5")
        victim.sendall(b"\x01")  # in the handshake for 30 s
        deadline = time.monotonic() + 5.0
        while not server._handshaking and time.monotonic() < deadline:
            time.sleep(0.01)
        (victim_side,) = server._handshaking.values()
        real_open = server.admission.open
        ended: list[threading.Thread] = []

        def open_then_end_victim_handshake(address: str) -> object:
            admitted = real_open(address)
            ending = threading.Thread(target=server._handshake_ended, args=(victim_side,))
            ending.start()
            ending.join(0.3)  # blocked on the server's lock when the fix is in
            ended.append(ending)
            return admitted

        server.admission.open = open_then_end_victim_handshake  # type: ignore[method-assign]
        newcomer = connect(ingest.port, "127.0.0.5")
        assert wait_closed(victim, 3.0) is not None
        server.admission.open = real_open  # type: ignore[method-assign]
        for thread in ended:
            thread.join(5.0)
        for sock in (victim, newcomer):
            sock.close()


def test_a_connection_reset_before_the_tls_handshake_leaves_no_socket_to_the_collector(tmp_path: Path) -> None:
    """``wrap_socket`` raises on a reset connection after taking the descriptor over; the
    half-built TLS socket is closed by tls_handshake, not later (with a ResourceWarning) by gc."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)
    with tcp_pair() as (client, server_side), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # an RST, not a FIN
        poller = select.poll()  # wait for the RST without reading it (a read would clear it)
        poller.register(server_side, select.POLLERR)
        assert poller.poll(5000), "no RST within 5 s"
        assert tls_handshake(server_side, context, 1.0) == (DropReason.CLOSED, "before the TLS handshake")
        gc.collect()
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]

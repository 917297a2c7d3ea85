"""The SCP's TCP server: connection admission and the handshake deadline in front of pynetdicom.

pynetdicom's server starts an :class:`~pynetdicom.association.Association` (two threads, one
association slot) for every accepted TCP connection, then waits up to the ACSE timeout for the
A-ASSOCIATE-RQ, reading it with blocking ``recv`` calls that a peer can stretch forever by
sending one byte at a time. :class:`AdmissionServer` replaces that front end, through the
``server_class`` seam of :meth:`pynetdicom.AE.make_server`:

1. In the accept loop, :class:`~dicom_node.ingest.admission.Admission` decides from the peer's
   address alone (handshakes in progress, connections and attempts per host); a refused
   connection is closed at once, before any thread exists for it, and an evicted one (the
   oldest still in the handshake, when a bound is full) is shut down.
2. In the connection's own thread, :func:`read_request` reads the whole A-ASSOCIATE-RQ PDU
   under one overall deadline (``ingest.handshake_timeout``). It waits with ``SO_RCVLOWAT`` set
   to the bytes still missing, so a trickling peer costs no CPU.
   On a TLS listener the TLS handshake comes first, in the same thread and under the same
   deadline (:func:`tls_handshake`): pynetdicom 3.0 wraps each socket in TLS inside its accept
   loop, where one client that connects and never sends its ClientHello holds up every later
   connection.
3. Only then is pynetdicom's request handler run: it creates the Association, whose socket
   (upstream's :class:`~pynetdicom.transport.AssociationSocket`, see :class:`_PrefixedSocket`)
   hands out the bytes already read before reading on, so the request is answered at once.
   The policy handler in ``scp.py`` counts accepted associations only.

Everything after the A-ASSOCIATE-RQ (negotiation, DIMSE, release) is upstream's, unchanged.
"""

import contextlib
import logging
import math
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.ingest.admission import Admission, Admitted, Refusal, host_key
from dicom_node.ingest.limits import ASSOCIATE_PDU_LIMIT, PduType, discard_queued
from dicom_node.logs import PeerLogLimiter
from dicom_node.tls import describe

logger = logging.getLogger(__name__)

_PDU_HEADER = struct.Struct(">BBL")


class DropReason(StrEnum):
    """Why a connection was dropped during the handshake."""

    TIMEOUT = "no complete A-ASSOCIATE-RQ within the handshake timeout"
    SILENT = "closed the connection without a word"  # port scans, TCP health checks
    CLOSED = "closed the connection during the handshake"
    NOT_A_REQUEST = "sent something other than an A-ASSOCIATE-RQ"
    TOO_LONG = "announced an A-ASSOCIATE-RQ over the length limit"
    EVICTED = "still in the handshake when a newer connection needed its place"
    TLS_TIMEOUT = "no TLS handshake within the handshake timeout"
    TLS_FAILED = "TLS handshake failed"


#: Why a connection was dropped, and details (a TLS alert's reason, say) when there are any.
Drop = tuple[DropReason, str]


def read_request(sock: socket.socket, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> bytearray | DropReason:
    """Read one whole A-ASSOCIATE-RQ PDU from ``sock``, or say why the peer should be dropped.

    ``timeout`` bounds the whole read, however the peer spaces its bytes. Between reads the
    thread sleeps in ``poll`` until the bytes still missing have arrived (``SO_RCVLOWAT``), so
    a peer sending one byte at a time wakes it only at the deadline.
    """
    deadline = clock() + timeout
    data = bytearray()
    need = _PDU_HEADER.size
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        while len(data) < need:
            remaining = deadline - clock()
            if remaining <= 0:
                return DropReason.TIMEOUT
            try:
                chunk = _receive(sock, poller, need - len(data), remaining)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue  # a spurious wake-up, or a TLS record not yet complete
            if chunk is None:
                return DropReason.TIMEOUT
            if not chunk:
                return DropReason.CLOSED if data else DropReason.SILENT
            data += chunk
            if need == _PDU_HEADER.size and len(data) == need:
                pdu_type, _, length = _PDU_HEADER.unpack_from(data)
                if pdu_type != PduType.A_ASSOCIATE_RQ:
                    return DropReason.NOT_A_REQUEST
                if length > ASSOCIATE_PDU_LIMIT:
                    return DropReason.TOO_LONG
                need += length
    except OSError:  # reset by the peer
        return DropReason.CLOSED if data else DropReason.SILENT
    finally:
        _wake_at(sock, 1)
    return data


def _receive(sock: socket.socket, poller: select.poll, nbytes: int, remaining: float) -> bytes | None:
    """Up to ``nbytes`` once some have arrived, or None when ``remaining`` seconds pass first.

    A TLS socket (non-blocking since its handshake) may hold decrypted bytes that ``poll``
    cannot see, and its record framing makes ``SO_RCVLOWAT`` meaningless: a trickling TLS peer
    wakes the thread per record, still bounded by the deadline.
    """
    timeout_ms = max(1, math.ceil(remaining * 1000))
    if isinstance(sock, ssl.SSLSocket):
        if not sock.pending() and not poller.poll(timeout_ms):
            return None
        return sock.recv(nbytes)
    _wake_at(sock, nbytes)
    if not poller.poll(timeout_ms):
        return None
    return sock.recv(nbytes, socket.MSG_DONTWAIT)


def tls_handshake(sock: socket.socket, context: ssl.SSLContext, timeout: float,
                  clock: Callable[[], float] = time.monotonic) -> ssl.SSLSocket | Drop:
    """The server side of a TLS handshake on ``sock``, under one overall deadline.

    Works on a duplicate of ``sock``'s descriptor, so ``sock`` stays the connection's handle
    for admission's bookkeeping: shutting it down (an eviction, the node's stop) wakes this
    thread and, later, pynetdicom's. The TLS socket is returned non-blocking, for
    :func:`read_request`; on a drop it is closed here.
    """
    deadline = clock() + timeout
    try:
        duplicate = sock.dup()
    except OSError:  # out of descriptors: drop this one rather than fail the thread
        return DropReason.CLOSED, "no descriptor for its TLS socket"
    try:
        conn = context.wrap_socket(duplicate, server_side=True, do_handshake_on_connect=False)
    except OSError as exc:  # reset (or evicted) before the handshake began
        _close_half_built(exc)
        duplicate.close()
        return DropReason.CLOSED, "before the TLS handshake"
    try:  # from here on, every way out but success closes the TLS socket
        conn.setblocking(False)
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        while True:
            try:
                conn.do_handshake()
                return conn
            except ssl.SSLWantReadError:
                poller.modify(conn, select.POLLIN)
            except ssl.SSLWantWriteError:
                poller.modify(conn, select.POLLOUT)
            remaining = deadline - clock()
            if remaining <= 0 or not poller.poll(max(1, math.ceil(remaining * 1000))):
                conn.close()
                return DropReason.TLS_TIMEOUT, ""
    except ssl.SSLEOFError:  # connected and closed before a ClientHello: a TCP health check
        conn.close()
        return DropReason.SILENT, ""
    except ssl.SSLError as exc:
        conn.close()
        return DropReason.TLS_FAILED, describe(exc)
    except OSError:
        conn.close()
        return DropReason.CLOSED, "during the TLS handshake"


def _close_half_built(error: BaseException) -> None:
    """Close the SSLSocket that ``wrap_socket`` had built when it raised ``error``.

    ``wrap_socket`` takes the descriptor over (``detach``) before it checks the connection; on a
    connection reset at that moment it raises without closing its new socket, which only the
    garbage collector would then close (with a ResourceWarning). The socket is found in the
    failed call's frames.
    """
    tb = error.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, ssl.SSLSocket):
            candidate.close()
        tb = tb.tb_next


def _wake_at(sock: socket.socket, nbytes: int) -> None:
    """Make poll report ``sock`` readable only once ``nbytes`` are buffered (or on EOF/error)."""
    with contextlib.suppress(OSError):  # if unsupported, poll wakes per segment; the deadline holds
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, nbytes))


def close_socket(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways and close it; never raises, never waits on the peer.

    ``shutdown`` is what wakes another thread blocked in ``recv`` or ``send`` on it.
    """
    _shutdown(sock)
    sock.close()


class _PrefixedSocket(AssociationSocket):
    """Upstream's socket wrapper, serving the bytes :func:`read_request` read before the socket's."""

    _prefix: bytearray

    @property
    def ready(self) -> bool:
        return bool(self._prefix) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        if not self._prefix:
            return super().recv(nr_bytes)
        head = self._prefix[:nr_bytes]
        del self._prefix[:nr_bytes]
        if len(head) < nr_bytes:
            head += super().recv(nr_bytes - len(head))
        return head


class _RequestHandler(RequestHandler):
    """Upstream's handler, but its socket starts with the request already read, and it runs
    the association to its end in the connection's thread, so the server knows when the
    connection is over."""

    server: "AdmissionServer"

    def handle(self) -> None:
        assoc = self._create_association()
        sock = assoc.dul.socket
        assert sock is not None
        # Re-classed rather than replaced: upstream's constructor has already queued the
        # "transport connection open" event, and a second wrapper would queue it twice.
        sock.__class__ = _PrefixedSocket
        cast(_PrefixedSocket, sock)._prefix = self.server.take_request(self.request)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        discard_queued(assoc)  # messages the peer's abort left waiting hold spool files


class AdmissionServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with admission rules and a handshake deadline in front.

    Pass it to :meth:`pynetdicom.AE.make_server` as ``server_class``, with the keyword arguments
    below. With an ``ssl_context`` it is a DICOM TLS listener: each connection's TLS handshake
    runs in the connection's own thread (:func:`tls_handshake`), never in the accept loop, and
    the handshake timeout covers the TLS handshake and the A-ASSOCIATE-RQ together.

    Parameters
    ----------
    admission
        The connection rules, checked in the accept loop.
    handshake_timeout
        Seconds a connection has to deliver its whole A-ASSOCIATE-RQ.
    peer_log
        Rate-limits the lines about refused and dropped connections, per host.
    """

    daemon_threads = True
    block_on_close = False  # stop() closes the sockets; nothing waits on a peer

    def __init__(self, ae: Any, address: tuple[str, int], ae_title: str, contexts: list[Any],
                 ssl_context: Any = None, evt_handlers: list[Any] | None = None, *,
                 admission: Admission, handshake_timeout: float, peer_log: PeerLogLimiter) -> None:
        # kept apart from upstream's ssl_context, which would wrap sockets in the accept loop
        self.tls_context: ssl.SSLContext | None = ssl_context
        self.admission = admission
        self.handshake_timeout = handshake_timeout
        self.peer_log = peer_log
        self._lock = threading.Lock()
        self._tickets: dict[socket.socket, int] = {}  # every open connection
        self._handshaking: dict[int, socket.socket] = {}
        self._evicted: set[int] = set()
        self._requests: dict[socket.socket, bytearray] = {}
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers,
                         request_handler=_RequestHandler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        return sock, address

    def service_actions(self) -> None:
        """Nothing: upstream runs a full ``gc.collect()`` in the accept loop every 60 connections.

        With torch loaded that takes 0.25-0.5 s, during which nothing is accepted, and a flood of
        connections would buy as many as it likes. Python's own collector still reclaims the
        cycles of finished associations (see ``test_finished_associations_are_reclaimed``).
        """

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """The accept loop's admission check; a False closes the socket at once."""
        # Admission and this server's tables change under one lock (taken in that order only):
        # otherwise a handshake could end between its eviction and the lookup of its socket,
        # leaving a live association that admission no longer counts.
        with self._lock:
            admitted = self.admission.open(str(client_address[0]))
            victim = None if isinstance(admitted, Refusal) else self._admitted(request, admitted)
        if isinstance(admitted, Refusal):
            self._note(client_address, "closed connection from %s: %s", admitted.value)
            return False
        if victim is not None:
            _shutdown(victim)  # its thread wakes, and reports it as evicted
        return True

    def _admitted(self, request: socket.socket, admitted: Admitted) -> socket.socket | None:
        """Record an admitted connection (lock held); the socket of the one it evicts, if any."""
        self._tickets[request] = admitted.ticket
        self._handshaking[admitted.ticket] = request
        if admitted.evict is None:
            return None
        self._evicted.add(admitted.evict)
        return self._handshaking.pop(admitted.evict, None)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread (out of threads): undo the admission, drop the peer
            self._finished(request, client_address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        conn: socket.socket | None = None
        try:
            conn, pdu = self._open(request)
            ticket = self._handshake_ended(request)
            if conn is None or isinstance(pdu, tuple):
                assert isinstance(pdu, tuple)
                self._dropped(client_address, ticket, *pdu)
                return
            with self._lock:
                self._requests[conn] = pdu
            self.finish_request(conn, client_address)
        except Exception:
            logger.exception("association with %s failed", client_address[0])
        finally:
            if conn is not None and conn is not request:
                with self._lock:
                    self._requests.pop(conn, None)
                conn.close()  # the TLS socket's own descriptor; _finished closes the connection
            self._finished(request, client_address)

    def _open(self, request: socket.socket) -> tuple[socket.socket | None, bytearray | Drop]:
        """The TLS handshake (on a TLS listener), then the A-ASSOCIATE-RQ, within one deadline."""
        deadline = time.monotonic() + self.handshake_timeout
        conn: socket.socket = request
        if self.tls_context is not None:
            secured = tls_handshake(request, self.tls_context, self.handshake_timeout)
            if isinstance(secured, tuple):
                return None, secured
            conn = secured
        pdu = read_request(conn, deadline - time.monotonic())
        if isinstance(pdu, DropReason):
            return conn, (pdu, "")
        if isinstance(conn, ssl.SSLSocket):
            conn.setblocking(True)  # pynetdicom polls before it reads, then reads blocking
        return conn, pdu

    def take_request(self, request: socket.socket) -> bytearray:
        """The A-ASSOCIATE-RQ read from ``request``, handed over once."""
        with self._lock:
            return self._requests.pop(request, bytearray())

    def drop_handshakes(self) -> None:
        """Close every connection still in the handshake (at stop: none of them is a peer yet)."""
        with self._lock:
            pending = list(self._handshaking.values())
        for sock in pending:
            _shutdown(sock)

    def close_connections(self) -> None:
        """Shut down every open connection, waking any thread blocked on one."""
        with self._lock:
            open_ = list(self._tickets)
        for sock in open_:
            _shutdown(sock)

    def open_connections(self) -> int:
        """Connections accepted and not yet closed (handshakes and associations)."""
        with self._lock:
            return len(self._tickets)

    def _handshake_ended(self, request: socket.socket) -> int:
        with self._lock:  # with admission's, as one step (see verify_request)
            ticket = self._tickets[request]
            self._handshaking.pop(ticket, None)
            self.admission.handshake_ended(ticket)
        return ticket

    def _dropped(self, client_address: Any, ticket: int, reason: DropReason, detail: str = "") -> None:
        with self._lock:
            if ticket in self._evicted:
                self._evicted.discard(ticket)
                reason, detail = DropReason.EVICTED, ""
        # A bare connect and close is what TCP health checks do: not worth a warning.
        level = logging.DEBUG if reason is DropReason.SILENT else logging.WARNING
        text = f"{reason.value} ({detail})" if detail else reason.value
        self._note(client_address, "dropped connection from %s: %s", text, level)

    def _finished(self, request: socket.socket, client_address: Any) -> None:
        with self._lock:
            ticket = self._tickets.pop(request)
            self._handshaking.pop(ticket, None)
            self._evicted.discard(ticket)
            self._requests.pop(request, None)
        self.admission.closed(ticket)
        close_socket(request)

    def _note(self, client_address: Any, msg: str, reason: str, level: int = logging.WARNING) -> None:
        address = str(client_address[0])
        self.peer_log.log(level, host_key(address), msg, address, reason)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed, or never connected
        sock.shutdown(socket.SHUT_RDWR)

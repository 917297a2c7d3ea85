"""Hostile and broken peers as plain sockets: empty connects, slow tricklers, stalled associations.

Everything here is bounded: a fixed number of sockets, every wait with a timeout, one thread per
:class:`Attack`. Attackers bind to their own loopback addresses (127.0.0.2, 127.0.0.3, ...) so
the node sees them as other hosts than the good peer on 127.0.0.1, as it would on a network.
"""

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(called: str = "XAI_NODE", calling: str = "HOSTILE") -> bytes:
    """A minimal, valid A-ASSOCIATE-RQ proposing Verification in Implicit VR Little Endian."""
    context = struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, VERIFICATION) + _item(0x40, IMPLICIT_VR_LE)
    user = _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.99")
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
            + bytes(32) + _item(0x10, b"1.2.840.10008.3.1.1.1") + _item(0x20, context) + _item(0x50, user))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def connect(port: int, source: str, timeout: float = 2.0) -> socket.socket:
    """A TCP connection to the node on 127.0.0.1:``port`` from the loopback address ``source``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the node closed or reset ``sock`` (reads and discards what it sent)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return not sock.recv(65536, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True


def stalled_association(port: int, source: str, timeout: float = 5.0) -> socket.socket:
    """An accepted association whose peer then sends a P-DATA-TF header and nothing more.

    The node's reader is left blocked mid-PDU: the case a stop must cut, not wait out.
    """
    sock = connect(port, source, timeout)
    sock.sendall(associate_rq(calling="STALLER"))
    header = _recv_exactly(sock, 6)
    assert header[0] == 0x02, f"expected an A-ASSOCIATE-AC, got PDU type {header[0]:#x}"
    _recv_exactly(sock, struct.unpack(">L", header[2:])[0])
    sock.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00")
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the node")
        data += chunk
    return data


@dataclass
class AttackCounts:
    """What an :class:`Attack` did, and how often the node cut it off."""

    trickle_connects: int = 0
    trickle_cut: int = 0  # closed by the node (handshake deadline or admission)
    empty_connects: int = 0
    connect_failures: int = 0


@dataclass
class Attack:
    """Empty connects and slow-trickle sockets, from one thread, until :meth:`stop`.

    Each trickler sends an A-ASSOCIATE-RQ PDU header announcing ``announced`` bytes, then one
    byte every ``trickle_interval`` s, and reconnects when the node cuts it off. Every
    ``1 / empty_per_second`` s one empty connection is opened: the even ones close at once
    without a word, the odd ones stay silent until the node closes them (or ``hold`` s pass).
    """

    port: int
    tricklers: int = 16
    trickle_interval: float = 2.0
    empty_per_second: float = 4.0
    trickle_source: str = "127.0.0.2"
    empty_source: str = "127.0.0.3"
    hold: float = 10.0
    announced: int = 200
    counts: AttackCounts = field(default_factory=AttackCounts)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="attack", daemon=True)
        self._trickle: list[tuple[socket.socket, float] | None] = [None] * self.tricklers
        self._silent: list[tuple[socket.socket, float]] = []

    def start(self) -> "Attack":
        self._thread.start()
        return self

    def stop(self) -> AttackCounts:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the attack thread did not stop"
        for entry in self._trickle:
            if entry is not None:
                entry[0].close()
        for sock, _ in self._silent:
            sock.close()
        return self.counts

    def _run(self) -> None:
        next_empty = time.monotonic()
        n_empty = 0
        while not self._stop.wait(0.05):
            now = time.monotonic()
            for i in range(self.tricklers):
                self._tend_trickler(i, now)
            if now >= next_empty:
                next_empty += 1.0 / self.empty_per_second
                self._empty_connect(keep=n_empty % 2 == 1, now=now)
                n_empty += 1
            self._silent = [(s, t) for s, t in self._silent if not self._expired(s, t, now)]

    def _tend_trickler(self, i: int, now: float) -> None:
        entry = self._trickle[i]
        if entry is not None and closed_by_peer(entry[0]):
            entry[0].close()
            self.counts.trickle_cut += 1
            entry = self._trickle[i] = None
        if entry is None:
            try:
                sock = connect(self.port, self.trickle_source, timeout=1.0)
                sock.sendall(struct.pack(">BBL", 0x01, 0, self.announced))
            except OSError:
                self.counts.connect_failures += 1
                return
            self.counts.trickle_connects += 1
            self._trickle[i] = (sock, now + self.trickle_interval)
        elif now >= entry[1]:
            with contextlib.suppress(OSError):  # cut off: noticed on the next tick
                entry[0].send(b"\x00", socket.MSG_DONTWAIT)
            self._trickle[i] = (entry[0], now + self.trickle_interval)

    def _empty_connect(self, keep: bool, now: float) -> None:
        try:
            sock = connect(self.port, self.empty_source, timeout=1.0)
        except OSError:
            self.counts.connect_failures += 1
            return
        self.counts.empty_connects += 1
        if keep:
            self._silent.append((sock, now + self.hold))
        else:
            sock.close()

    @staticmethod
    def _expired(sock: socket.socket, until: float, now: float) -> bool:
        if now >= until or closed_by_peer(sock):
            sock.close()
            return True
        return False

"""Connection admission: which TCP connections may start an association handshake.

These rules run in the accept loop, before a peer has said who it is, so they can only look at
its address. They bound three things, each so that a hostile or broken peer cannot starve the
others:

- connections still in the handshake (accepted, A-ASSOCIATE-RQ not yet complete), all peers
  together: ``max_handshakes``;
- open connections (handshake or association) per host: ``max_connections_per_host``;
- connection attempts per host over time: a token bucket that holds ``connects_per_minute``
  tokens and refills at that many per minute.

When one of the first two is full, a new connection does not simply lose: the oldest
connection still in the handshake is evicted to make room. A real peer sends its
A-ASSOCIATE-RQ within milliseconds of connecting, so the oldest are the slow or silent ones;
without this, a peer behind the same address (or a few hosts together) could keep every place
taken by connections that never finish.

- A full host evicts its own oldest handshake, however young: its connections compete among
  themselves, and its attempt rate is bounded, so a good peer's handshake (milliseconds) is not
  outlived by the host's whole allowance of newer ones.
- A full pool evicts the oldest handshake of any host only once it is ``evict_after`` seconds
  old: the number of hosts is not bounded, so under a flood from many of them the newcomer is
  refused rather than a handshake that might just be on a slow link.

Accepted associations are counted apart, by :class:`dicom_node.ingest.policy.AssociationPolicy`.
The rules are plain bookkeeping under one lock with an injected clock; the socket work is in
:mod:`dicom_node.ingest.transport`.
"""

import ipaddress
import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

#: Hosts remembered at once. A host with no open connection and a full bucket is forgotten, as
#: remembering it would change nothing; this caps what a peer with many addresses can cost.
MAX_TRACKED_HOSTS = 4096


class Refusal(StrEnum):
    """Why a connection was closed in the accept loop, before any handshake."""

    HANDSHAKES_FULL = "too many connections in the handshake"
    HOST_CONNECTIONS = "too many open connections from this host"
    HOST_RATE = "too many connection attempts from this host"
    TOO_MANY_HOSTS = "too many hosts tracked at once"


@dataclass(frozen=True)
class AdmissionLimits:
    """The bounds of :class:`Admission` (see the module docstring)."""

    max_handshakes: int = 64
    max_connections_per_host: int = 20
    connects_per_minute: int = 600
    evict_after: float = 1.0


def host_key(address: str) -> str:
    """The key a peer's limits are kept under: its IPv4 address, or its IPv6 /64.

    One IPv6 host usually owns a whole /64, so counting addresses would give it billions of
    fresh budgets. IPv4-mapped IPv6 addresses count as the IPv4 address. Anything that is not
    an IP address (a Unix socket path, say) is its own key.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Admitted:
    """A connection let in: its ticket, and the ticket of a connection to evict for it, if any."""

    ticket: int
    evict: int | None = None


@dataclass
class _Host:
    connections: int
    tokens: float
    updated: float


@dataclass(frozen=True)
class _Connection:
    host: str
    opened: float


class Admission:
    """Thread-safe bookkeeping of the admission rules.

    A connection's life is :meth:`open` (in the accept loop; a :class:`Refusal` means close it
    at once), then :meth:`handshake_ended` (the A-ASSOCIATE-RQ arrived, or the peer was
    dropped), then :meth:`closed`, both with the ticket :meth:`open` gave. When
    :meth:`open` names a connection to evict, its places are freed at once; the caller closes
    it, and the later calls for its ticket change nothing.

    Parameters
    ----------
    limits
        The bounds.
    clock
        Seconds, monotonic; injected so tests step time instead of sleeping.
    """

    def __init__(self, limits: AdmissionLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._hosts: dict[str, _Host] = {}
        self._open: dict[int, _Connection] = {}
        self._handshaking: dict[int, _Connection] = {}  # insertion order: oldest first
        self._tickets = itertools.count(1)

    @property
    def handshakes(self) -> int:
        """Connections now in the handshake."""
        return len(self._handshaking)

    def connections(self, address: str) -> int:
        """Open connections now counted for the host of ``address``."""
        with self._lock:
            host = self._hosts.get(host_key(address))
            return host.connections if host else 0

    def open(self, address: str) -> Admitted | Refusal:
        """Let a new connection from ``address`` in, or say why it must be closed."""
        now = self._clock()
        key = host_key(address)
        with self._lock:
            host = self._host(key, now)
            if host is None:
                return Refusal.TOO_MANY_HOSTS
            self._refill(host, now)
            if host.tokens < 1:
                return Refusal.HOST_RATE
            host.tokens -= 1  # an attempt costs a token even when refused below
            evict = None
            if host.connections >= self.limits.max_connections_per_host:
                evict = self._oldest(key)
                if evict is None:
                    return Refusal.HOST_CONNECTIONS
            elif len(self._handshaking) >= self.limits.max_handshakes:
                evict = self._oldest(None, now - self.limits.evict_after)
                if evict is None:
                    return Refusal.HANDSHAKES_FULL
            if evict is not None:
                self._release(evict, self._handshaking.pop(evict))
            ticket = next(self._tickets)
            self._open[ticket] = self._handshaking[ticket] = _Connection(key, now)
            host.connections += 1
            return Admitted(ticket, evict)

    def handshake_ended(self, ticket: int) -> None:
        """The connection left the handshake: its A-ASSOCIATE-RQ arrived, or it was dropped."""
        with self._lock:
            self._handshaking.pop(ticket, None)

    def closed(self, ticket: int) -> None:
        """The connection is closed."""
        with self._lock:
            self._handshaking.pop(ticket, None)
            connection = self._open.get(ticket)
            if connection is not None:
                self._release(ticket, connection)

    def _release(self, ticket: int, connection: _Connection) -> None:
        del self._open[ticket]
        host = self._hosts.get(connection.host)
        if host is not None:
            host.connections = max(0, host.connections - 1)

    def _oldest(self, host: str | None, opened_by: float = math.inf) -> int | None:
        """The oldest connection in the handshake (of ``host``, if given) opened by ``opened_by``."""
        for ticket, connection in self._handshaking.items():
            if host is None or connection.host == host:
                return ticket if connection.opened <= opened_by else None
        return None

    def _host(self, key: str, now: float) -> _Host | None:
        host = self._hosts.get(key)
        if host is not None:
            return host
        if len(self._hosts) >= MAX_TRACKED_HOSTS:
            self._forget_idle(now)
            if len(self._hosts) >= MAX_TRACKED_HOSTS:
                return None
        host = _Host(0, float(self.limits.connects_per_minute), now)
        self._hosts[key] = host
        return host

    def _refill(self, host: _Host, now: float) -> None:
        capacity = float(self.limits.connects_per_minute)
        elapsed = max(0.0, now - host.updated)
        host.tokens = min(capacity, host.tokens + elapsed * capacity / 60.0)
        host.updated = now

    def _forget_idle(self, now: float) -> None:
        for key, host in list(self._hosts.items()):
            self._refill(host, now)
            if host.connections == 0 and host.tokens >= self.limits.connects_per_minute:
                del self._hosts[key]

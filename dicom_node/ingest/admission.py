"""Connection admission: which TCP connections may start an association handshake.

These rules run in the accept loop, before a peer has said who it is, so they can only look at
its address. They bound three things, each so that a hostile or broken peer cannot starve the
others:

- connections still in the handshake (accepted, A-ASSOCIATE-RQ not yet complete), all peers
  together: ``max_handshakes``;
- open connections (handshake or association) per host: ``max_connections_per_host``;
- connection attempts per host over time: a token bucket that holds ``connects_per_minute``
  tokens and refills at that many per minute.

Accepted associations are counted apart, by :class:`dicom_node.ingest.policy.AssociationPolicy`.
The rules are plain bookkeeping under one lock with an injected clock; the socket work is in
:mod:`dicom_node.ingest.transport`.
"""

import ipaddress
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


@dataclass
class _Host:
    connections: int
    tokens: float
    updated: float


class Admission:
    """Thread-safe counters for the admission rules.

    A connection's life is :meth:`open` (in the accept loop; a refusal means close it at once),
    then :meth:`handshake_ended` (the A-ASSOCIATE-RQ arrived, or the peer was dropped), then
    :meth:`closed`. Each call of :meth:`open` that returned None must be followed by exactly
    one of each.

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
        self._handshakes = 0

    @property
    def handshakes(self) -> int:
        """Connections now in the handshake."""
        return self._handshakes

    def connections(self, address: str) -> int:
        """Open connections now counted for the host of ``address``."""
        with self._lock:
            host = self._hosts.get(host_key(address))
            return host.connections if host else 0

    def open(self, address: str) -> Refusal | None:
        """Count a new connection from ``address``, or say why it must be closed."""
        now = self._clock()
        with self._lock:
            host = self._host(host_key(address), now)
            if host is None:
                return Refusal.TOO_MANY_HOSTS
            self._refill(host, now)
            if host.tokens < 1:
                return Refusal.HOST_RATE
            host.tokens -= 1  # an attempt costs a token even when refused below
            if host.connections >= self.limits.max_connections_per_host:
                return Refusal.HOST_CONNECTIONS
            if self._handshakes >= self.limits.max_handshakes:
                return Refusal.HANDSHAKES_FULL
            host.connections += 1
            self._handshakes += 1
            return None

    def handshake_ended(self) -> None:
        """The connection left the handshake: its A-ASSOCIATE-RQ arrived, or it was dropped."""
        with self._lock:
            self._handshakes = max(0, self._handshakes - 1)

    def closed(self, address: str) -> None:
        """The connection from ``address`` is closed."""
        with self._lock:
            host = self._hosts.get(host_key(address))
            if host is not None:
                host.connections = max(0, host.connections - 1)

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

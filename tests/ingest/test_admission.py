"""The connection admission rules as bookkeeping on a stepped clock: no sockets, no sleeping."""

import pytest

from dicom_node.ingest import admission as admission_module
from dicom_node.ingest.admission import Admission, AdmissionLimits, Admitted, Refusal, host_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **limits: float) -> Admission:
    return Admission(AdmissionLimits(**limits), clock)  # type: ignore[arg-type]


def admit(rules: Admission, address: str) -> Admitted:
    result = rules.open(address)
    assert isinstance(result, Admitted), result
    return result


def connect_and_close(rules: Admission, address: str) -> Refusal | None:
    result = rules.open(address)
    if isinstance(result, Refusal):
        return result
    rules.handshake_ended(result.ticket)
    rules.closed(result.ticket)
    return None


def test_host_keys_group_an_ipv6_64_and_unmap_ipv4() -> None:
    assert host_key("10.1.2.3") == "10.1.2.3"
    assert host_key("2001:db8:1:2:aaaa::1") == host_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert host_key("2001:db8:1:3::1") != host_key("2001:db8:1:2::1")
    assert host_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert host_key("fe80::1%eth0") == "fe80::/64"
    assert host_key("not an address") == "not an address"


def test_handshakes_are_bounded_across_hosts_and_freed_when_they_end() -> None:
    clock = Clock()
    rules = make(clock, max_handshakes=2)
    first = admit(rules, "10.0.0.1")
    admit(rules, "10.0.0.2")
    assert rules.open("10.0.0.3") is Refusal.HANDSHAKES_FULL
    rules.handshake_ended(first.ticket)  # its A-ASSOCIATE-RQ arrived: it no longer counts here
    assert admit(rules, "10.0.0.3").evict is None
    assert rules.handshakes == 2


def test_connections_per_host_count_handshakes_and_associations_until_closed() -> None:
    clock = Clock()
    rules = make(clock, max_connections_per_host=2)
    first = admit(rules, "10.0.0.1")
    rules.handshake_ended(first.ticket)  # now an association: still an open connection of its host
    second = admit(rules, "10.0.0.1")
    rules.handshake_ended(second.ticket)
    assert rules.open("10.0.0.1") is Refusal.HOST_CONNECTIONS
    admit(rules, "10.0.0.2")  # other hosts are not affected
    rules.closed(first.ticket)
    assert rules.connections("10.0.0.1") == 1
    admit(rules, "10.0.0.1")


def test_an_ipv6_host_cannot_escape_its_limit_by_changing_address() -> None:
    rules = make(Clock(), max_connections_per_host=1)
    rules.handshake_ended(admit(rules, "2001:db8::1").ticket)
    assert rules.open("2001:db8::2") is Refusal.HOST_CONNECTIONS


def test_a_full_host_evicts_its_oldest_handshake() -> None:
    clock = Clock()
    rules = make(clock, max_connections_per_host=3, evict_after=1.0)
    oldest = admit(rules, "10.0.0.1")
    association = admit(rules, "10.0.0.1")
    rules.handshake_ended(association.ticket)
    younger = admit(rules, "10.0.0.1")
    admit(rules, "10.0.0.2")  # another host's handshake is older than `younger`, but not this host's
    newcomer = admit(rules, "10.0.0.1")
    assert newcomer.evict == oldest.ticket  # however young: the host competes with itself
    assert rules.connections("10.0.0.1") == 3
    rules.handshake_ended(oldest.ticket)  # the evicted connection's own calls change nothing
    rules.closed(oldest.ticket)
    assert rules.connections("10.0.0.1") == 3
    assert admit(rules, "10.0.0.1").evict == younger.ticket
    assert admit(rules, "10.0.0.1").evict == newcomer.ticket


def test_a_full_host_with_only_associations_refuses() -> None:
    rules = make(Clock(), max_connections_per_host=2)
    for _ in range(2):
        rules.handshake_ended(admit(rules, "10.0.0.1").ticket)
    assert rules.open("10.0.0.1") is Refusal.HOST_CONNECTIONS


def test_full_handshakes_evict_the_oldest_slow_one_of_any_host() -> None:
    clock = Clock()
    rules = make(clock, max_handshakes=2, evict_after=1.0)
    oldest = admit(rules, "10.0.0.1")
    clock.now += 0.6
    admit(rules, "10.0.0.2")
    assert rules.open("10.0.0.3") is Refusal.HANDSHAKES_FULL
    clock.now += 0.6
    result = admit(rules, "10.0.0.3")
    assert result.evict == oldest.ticket
    assert rules.handshakes == 2 and rules.connections("10.0.0.1") == 0


def test_connection_attempts_per_host_are_a_token_bucket() -> None:
    clock = Clock()
    rules = make(clock, connects_per_minute=60)  # one a second, bursts of 60
    for _ in range(60):
        assert connect_and_close(rules, "10.0.0.1") is None
    assert connect_and_close(rules, "10.0.0.1") is Refusal.HOST_RATE
    assert connect_and_close(rules, "10.0.0.2") is None
    clock.now += 0.5
    assert connect_and_close(rules, "10.0.0.1") is Refusal.HOST_RATE
    clock.now += 0.5  # one token back
    assert connect_and_close(rules, "10.0.0.1") is None
    assert connect_and_close(rules, "10.0.0.1") is Refusal.HOST_RATE
    clock.now += 3600  # refills to the burst, never beyond
    for _ in range(60):
        assert connect_and_close(rules, "10.0.0.1") is None
    assert connect_and_close(rules, "10.0.0.1") is Refusal.HOST_RATE


def test_a_refused_attempt_costs_a_token_but_no_connection() -> None:
    clock = Clock()
    rules = make(clock, connects_per_minute=3, max_connections_per_host=1)
    held = admit(rules, "10.0.0.1")
    rules.handshake_ended(held.ticket)  # an association: nothing to evict
    assert rules.open("10.0.0.1") is Refusal.HOST_CONNECTIONS
    assert rules.open("10.0.0.1") is Refusal.HOST_CONNECTIONS
    rules.closed(held.ticket)
    assert rules.connections("10.0.0.1") == 0
    assert rules.open("10.0.0.1") is Refusal.HOST_RATE  # hammering while full spent the bucket


def test_hosts_tracked_are_bounded_and_idle_ones_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission_module, "MAX_TRACKED_HOSTS", 3)
    clock = Clock()
    rules = make(clock, connects_per_minute=10)
    tickets = {host: admit(rules, host).ticket for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3")}
    assert rules.open("10.0.0.4") is Refusal.TOO_MANY_HOSTS  # all three have open connections
    for host in ("10.0.0.1", "10.0.0.2"):
        rules.closed(tickets[host])
    assert rules.open("10.0.0.4") is Refusal.TOO_MANY_HOSTS  # closed, but their buckets are not full
    clock.now += 60  # buckets full again: nothing to remember about those two
    admit(rules, "10.0.0.4")
    admit(rules, "10.0.0.5")


def test_unknown_and_repeated_tickets_change_nothing() -> None:
    rules = make(Clock(), max_handshakes=1)
    rules.handshake_ended(12345)
    rules.closed(12345)
    ticket = admit(rules, "10.0.0.9").ticket
    rules.closed(ticket)
    rules.closed(ticket)
    assert rules.handshakes == 0 and rules.connections("10.0.0.9") == 0
    admit(rules, "10.0.0.9")
    assert rules.open("10.0.0.8") is Refusal.HANDSHAKES_FULL

"""The connection admission rules as bookkeeping on a stepped clock: no sockets, no sleeping."""

import pytest

from dicom_node.ingest import admission as admission_module
from dicom_node.ingest.admission import Admission, AdmissionLimits, Refusal, host_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **limits: int) -> Admission:
    return Admission(AdmissionLimits(**limits), clock)


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
    assert rules.open("10.0.0.1") is None
    assert rules.open("10.0.0.2") is None
    assert rules.open("10.0.0.3") is Refusal.HANDSHAKES_FULL
    rules.handshake_ended()  # the first one's A-ASSOCIATE-RQ arrived: it no longer counts here
    assert rules.open("10.0.0.3") is None
    assert rules.handshakes == 2


def test_connections_per_host_count_handshakes_and_associations_until_closed() -> None:
    clock = Clock()
    rules = make(clock, max_connections_per_host=2)
    assert rules.open("10.0.0.1") is None
    rules.handshake_ended()  # now an association: still an open connection of its host
    assert rules.open("10.0.0.1") is None
    assert rules.open("10.0.0.1") is Refusal.HOST_CONNECTIONS
    assert rules.open("10.0.0.2") is None  # other hosts are not affected
    rules.closed("10.0.0.1")
    assert rules.connections("10.0.0.1") == 1
    assert rules.open("10.0.0.1") is None


def test_an_ipv6_host_cannot_escape_its_limit_by_changing_address() -> None:
    rules = make(Clock(), max_connections_per_host=1)
    assert rules.open("2001:db8::1") is None
    assert rules.open("2001:db8::2") is Refusal.HOST_CONNECTIONS


def _connect_and_close(rules: Admission, address: str) -> Refusal | None:
    refusal = rules.open(address)
    if refusal is None:
        rules.handshake_ended()
        rules.closed(address)
    return refusal


def test_connection_attempts_per_host_are_a_token_bucket() -> None:
    clock = Clock()
    rules = make(clock, connects_per_minute=60)  # one a second, bursts of 60
    for _ in range(60):
        assert _connect_and_close(rules, "10.0.0.1") is None
    assert _connect_and_close(rules, "10.0.0.1") is Refusal.HOST_RATE
    assert _connect_and_close(rules, "10.0.0.2") is None
    clock.now += 0.5
    assert _connect_and_close(rules, "10.0.0.1") is Refusal.HOST_RATE
    clock.now += 0.5  # one token back
    assert _connect_and_close(rules, "10.0.0.1") is None
    assert _connect_and_close(rules, "10.0.0.1") is Refusal.HOST_RATE
    clock.now += 3600  # refills to the burst, never beyond
    for _ in range(60):
        assert _connect_and_close(rules, "10.0.0.1") is None
    assert _connect_and_close(rules, "10.0.0.1") is Refusal.HOST_RATE


def test_a_refused_attempt_costs_a_token_but_no_connection() -> None:
    clock = Clock()
    rules = make(clock, connects_per_minute=3, max_connections_per_host=1)
    assert rules.open("10.0.0.1") is None
    assert rules.open("10.0.0.1") is Refusal.HOST_CONNECTIONS
    assert rules.open("10.0.0.1") is Refusal.HOST_CONNECTIONS
    rules.handshake_ended()
    rules.closed("10.0.0.1")
    assert rules.connections("10.0.0.1") == 0
    assert rules.open("10.0.0.1") is Refusal.HOST_RATE  # hammering while full spent the bucket


def test_hosts_tracked_are_bounded_and_idle_ones_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission_module, "MAX_TRACKED_HOSTS", 3)
    clock = Clock()
    rules = make(clock, connects_per_minute=10)
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert rules.open(host) is None
    assert rules.open("10.0.0.4") is Refusal.TOO_MANY_HOSTS  # all three have open connections
    for host in ("10.0.0.1", "10.0.0.2"):
        rules.handshake_ended()
        rules.closed(host)
    assert rules.open("10.0.0.4") is Refusal.TOO_MANY_HOSTS  # closed, but their buckets are not full
    clock.now += 60  # buckets full again: nothing to remember about those two
    assert rules.open("10.0.0.4") is None
    assert rules.open("10.0.0.5") is None


def test_closing_more_than_opened_never_goes_negative() -> None:
    rules = make(Clock(), max_handshakes=1)
    rules.handshake_ended()
    rules.closed("10.0.0.9")
    assert rules.handshakes == 0
    assert rules.open("10.0.0.9") is None
    assert rules.open("10.0.0.8") is Refusal.HANDSHAKES_FULL

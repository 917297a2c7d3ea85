"""The outbox and the exporter against an in-process SCP that answers what the test asks."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from dicom_node.config import Destination, ExportSettings
from dicom_node.export import DeliveryState, Exporter, Outbox, OutboxError, Outcome, Result, classify
from tests.factories import TEST_ROOT, ct_dataset

SC = str(SecondaryCaptureImageStorage)


class Peer:
    """A storage SCP on a free port whose next statuses the test sets."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.received: list[str] = []
        self.ae = AE(ae_title="PACS")
        self.ae.require_called_aet = True  # rejects a wrong called AE title, as a PACS does
        self.ae.add_supported_context(SecondaryCaptureImageStorage)
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]
        self.stopped = False

    def _store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.statuses.pop(0) if self.statuses else 0x0000

    def stop(self) -> None:
        if not self.stopped:
            self.server.shutdown()
            self.stopped = True


@pytest.fixture
def peer() -> Iterator[Peer]:
    server = Peer()
    yield server
    server.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _results(tmp_path: Path, count: int) -> list[Result]:
    results = []
    for i in range(count):
        ds: Dataset = ct_dataset(sop=f"{TEST_ROOT}4.{i + 1}")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SC  # a result the node made
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        results.append(Result(ds.SOPInstanceUID, SC, ds.StudyInstanceUID, path))
    return results


def _exporter(tmp_path: Path, port: int, clock: Clock, ae_title: str = "PACS") -> Exporter:
    outbox = Outbox(tmp_path / "db.sqlite", clock=clock)
    settings = ExportSettings(max_attempts=3, backoff_seconds=10, max_backoff_seconds=40, timeout_seconds=5)
    return Exporter(outbox, [Destination("pacs", ae_title, "127.0.0.1", port)], settings, "XAI_NODE", clock=clock)


@pytest.mark.parametrize(("status", "outcome"), [
    (0x0000, Outcome.DELIVERED), (0xB000, Outcome.DELIVERED), (0xB007, Outcome.DELIVERED),
    (0x0107, Outcome.DELIVERED), (0xA700, Outcome.TRANSIENT), (0xA7FF, Outcome.TRANSIENT),
    (None, Outcome.NO_RESPONSE), (0xA900, Outcome.PERMANENT), (0xC000, Outcome.PERMANENT),
    (0x0110, Outcome.PERMANENT), (0x0122, Outcome.PERMANENT),
])
def test_statuses_are_classified(status: int | None, outcome: Outcome) -> None:
    assert classify(status) is outcome


def test_one_association_delivers_every_due_record_and_warnings_count(tmp_path: Path, peer: Peer) -> None:
    clock = Clock()
    exporter = _exporter(tmp_path, peer.port, clock)
    exporter.outbox.enqueue(1, _results(tmp_path, 3), ["pacs"])
    peer.statuses = [0x0000, 0xB000, 0x0000]
    assert exporter.send_due() == 3
    records = exporter.outbox.list()
    assert {r.state for r in records} == {DeliveryState.DELIVERED}
    assert [r.reason for r in sorted(records, key=lambda r: r.id)] == ["", "warning 0xB000", ""]
    assert sorted(peer.received) == [f"{TEST_ROOT}4.{i}" for i in (1, 2, 3)]
    assert exporter.send_due() == 0  # nothing is sent twice


def test_out_of_resources_is_retried_with_backoff_until_it_goes_through(tmp_path: Path, peer: Peer) -> None:
    clock = Clock()
    exporter = _exporter(tmp_path, peer.port, clock)
    exporter.outbox.enqueue(1, _results(tmp_path, 1), ["pacs"])
    peer.statuses = [0xA700] * 5
    for attempt in range(5):  # transient: never dead, however many attempts
        assert exporter.send_due() == 0
        [record] = exporter.outbox.list()
        assert record.state == DeliveryState.PENDING and "0xA700" in record.reason
        assert record.not_before == clock.now + min(40, 10 * 2 ** attempt)
        assert exporter.send_due() == 0  # not due yet: nothing sent
        clock.now = record.not_before
    assert exporter.send_due() == 1
    assert len(peer.received) == 6


def test_a_data_error_is_retried_a_few_times_then_dead_with_its_reason(tmp_path: Path, peer: Peer) -> None:
    clock = Clock()
    exporter = _exporter(tmp_path, peer.port, clock)
    exporter.outbox.enqueue(1, _results(tmp_path, 1), ["pacs"])
    peer.statuses = [0xC000] * 3
    for _ in range(3):
        exporter.send_due()
        clock.now += 1000
    [record] = exporter.outbox.list()
    assert record.state == DeliveryState.DEAD and record.attempts == 3 and "status 0xC000" in record.reason
    retried = exporter.outbox.retry(record.id)  # the operator sends it again
    assert retried.state == DeliveryState.PENDING and retried.attempts == 0
    assert exporter.send_due() == 1
    with pytest.raises(OutboxError, match="no outbox record 99"):
        exporter.outbox.retry(99)


def test_a_rejected_association_ends_dead_and_a_refused_connection_waits(tmp_path: Path, peer: Peer) -> None:
    clock = Clock()
    (tmp_path / "a").mkdir()
    wrong = _exporter(tmp_path / "a", peer.port, clock, ae_title="NOT_PACS")
    wrong.outbox.enqueue(1, _results(tmp_path, 1), ["pacs"])
    for _ in range(10):  # one rejection ends it; a loaded machine may first time out (transient)
        wrong.send_due()
        clock.now += 1000
        [record] = wrong.outbox.list()
        if record.state != DeliveryState.PENDING:
            break
    assert record.state == DeliveryState.DEAD and "association rejected" in record.reason
    (tmp_path / "b").mkdir()
    down = _exporter(tmp_path / "b", peer.port, clock)
    peer.stop()
    down.outbox.enqueue(1, _results(tmp_path, 1), ["pacs"])
    for _ in range(4):
        down.send_due()
        clock.now += 1000
    [record] = down.outbox.list()
    assert record.state == DeliveryState.PENDING and record.attempts == 4 and "no association" in record.reason


def test_the_same_job_again_keeps_deliveries_and_a_new_job_sends_again(tmp_path: Path, peer: Peer) -> None:
    clock = Clock()
    exporter = _exporter(tmp_path, peer.port, clock)
    results = _results(tmp_path, 2)
    assert exporter.outbox.enqueue(7, results, ["pacs"]) == 2
    exporter.send_due()
    assert exporter.outbox.enqueue(7, results, ["pacs"]) == 0  # the job ran again after a crash
    assert exporter.send_due() == 0 and len(peer.received) == 2
    assert exporter.outbox.enqueue(8, results, ["pacs"]) == 2  # the series changed: a new job
    assert exporter.send_due() == 2 and len(peer.received) == 4
    assert exporter.outbox.counts() == {"delivered": 2}


def test_a_missing_destination_is_dead_at_once_and_a_missing_file_after_its_attempts(
        tmp_path: Path, peer: Peer) -> None:
    clock = Clock()
    exporter = _exporter(tmp_path, peer.port, clock)
    [result] = _results(tmp_path, 1)
    result.path.unlink()
    exporter.outbox.enqueue(1, [result], ["pacs", "gone"])
    exporter.send_due()
    [gone] = exporter.outbox.list(DeliveryState.DEAD)
    assert gone.reason == "destination 'gone' is not configured"
    for _ in range(2):
        clock.now += 1000
        exporter.send_due()
    reasons = sorted(r.reason for r in exporter.outbox.list(DeliveryState.DEAD))
    assert len(reasons) == 2 and reasons[1].startswith("result file unreadable")


def test_a_record_reset_by_a_newer_job_while_in_flight_is_not_marked_delivered(tmp_path: Path, peer: Peer) -> None:
    clock = Clock()
    exporter = _exporter(tmp_path, peer.port, clock)
    results = _results(tmp_path, 1)
    exporter.outbox.enqueue(1, results, ["pacs"])
    [snapshot] = exporter.outbox.due()
    clock.now += 1
    exporter.outbox.enqueue(2, results, ["pacs"])  # the series changed while job 1's copy was sent
    assert not exporter.outbox.delivered(snapshot)
    assert exporter.outbox.enqueue(1, results, ["pacs"]) == 0  # an older job never takes it back
    [record] = exporter.outbox.list()
    assert record.state == DeliveryState.PENDING and record.job_id == 2


def test_every_0xbxxx_status_is_a_warning_and_a_pass_survives_a_bad_record(tmp_path: Path, peer: Peer) -> None:
    assert classify(0xB123) is Outcome.DELIVERED
    clock = Clock()
    exporter = _exporter(tmp_path, peer.port, clock)
    results = _results(tmp_path, 2)
    results[0].path.write_bytes(b"\0" * 128 + b"DICM")  # a preamble and nothing else
    exporter.outbox.enqueue(1, results, ["pacs"])
    assert exporter.send_due() == 1  # the good one still goes
    assert exporter._backoff(5000) == clock.now + 40  # no overflow after days of retries


def test_records_waiting_for_a_destination_removed_from_the_config_are_dead(tmp_path: Path, peer: Peer) -> None:
    clock = Clock()
    exporter = _exporter(tmp_path, peer.port, clock)
    exporter.outbox.enqueue(1, _results(tmp_path, 1), ["pacs", "gone"])
    for record in exporter.outbox.due():
        exporter.outbox.retry_later(record, "busy", clock.now + 1000)  # waiting out a backoff
    assert exporter.bury_unconfigured() == 1
    assert exporter.outbox.counts() == {"dead": 1, "pending": 1}
    [dead] = exporter.outbox.list(DeliveryState.DEAD)
    assert dead.destination == "gone" and dead.reason == "destination 'gone' is not configured"

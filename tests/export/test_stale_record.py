"""Failures recorded against the record as it is now, not as it was first read:
with a real clock, every change moves ``updated_at``, and an update made from an
older copy used to be lost, so a record that failed this way was sent again on every poll."""

import sqlite3
import time
from pathlib import Path

import pytest

from dicom_node.config import Destination, ExportSettings
from dicom_node.export import DeliveryState, Exporter, Outbox
from dicom_node.export.outbox import _MIGRATIONS
from dicom_node.store.db import connect, migrate
from tests.export.test_outbox import Clock, Peer, _results


class FailingAssociation:
    """An established association whose every C-STORE raises what pynetdicom may raise."""

    is_established = True

    def __init__(self) -> None:
        self.stores = 0

    def send_c_store(self, path: object) -> None:
        self.stores += 1
        raise RuntimeError("pynetdicom hiccup")

    def release(self) -> None:
        pass


def _real_time_exporter(tmp_path: Path, port: int, backoff: float) -> Exporter:
    outbox = Outbox(tmp_path / "db.sqlite")  # time.time: each change moves updated_at
    settings = ExportSettings(max_attempts=3, backoff_seconds=backoff, max_backoff_seconds=backoff,
                              timeout_seconds=5)
    return Exporter(outbox, [Destination("pacs", "PACS", "127.0.0.1", port)], settings, "XAI_NODE")


def test_an_error_escaping_the_send_counts_an_attempt_backs_off_and_ends_dead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = _real_time_exporter(tmp_path, 1, backoff=60)
    assoc = FailingAssociation()
    monkeypatch.setattr(exporter, "_associate", lambda destination, records: assoc)
    exporter.outbox.enqueue(1, _results(tmp_path, 1), ["pacs"])
    for _ in range(3):  # passes as fast as the poll: the backoff holds the record back
        exporter.send_to("pacs")
        time.sleep(0.01)
    [record] = exporter.outbox.list()
    assert (assoc.stores, record.sends, record.attempts) == (1, 1, 1)
    assert record.state == DeliveryState.PENDING and record.not_before > time.time() + 30
    assert record.reason == "pacs: RuntimeError: pynetdicom hiccup"

    (tmp_path / "no-backoff").mkdir()
    exporter = _real_time_exporter(tmp_path / "no-backoff", 1, backoff=0)
    monkeypatch.setattr(exporter, "_associate", lambda destination, records: assoc)
    exporter.outbox.enqueue(1, _results(tmp_path, 1), ["pacs"])
    for _ in range(6):
        exporter.send_to("pacs")
        time.sleep(0.01)
    [record] = exporter.outbox.list()
    assert record.state == DeliveryState.DEAD and (record.attempts, record.sends) == (3, 3)


def test_a_locked_database_after_the_pacs_stored_it_is_recorded_and_backs_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    peer = Peer()
    try:
        exporter = _real_time_exporter(tmp_path, peer.port, backoff=60)
        exporter.outbox.enqueue(1, _results(tmp_path, 1), ["pacs"])

        def locked(*args: object) -> bool:
            raise sqlite3.OperationalError("database is locked")

        with monkeypatch.context() as patch:
            patch.setattr(exporter.outbox, "delivered", locked)
            assert exporter.send_to("pacs") == 0
            assert exporter.send_to("pacs") == 0  # the next poll: held back by the backoff
        assert len(peer.received) == 1
        [record] = exporter.outbox.list()
        assert (record.state, record.attempts, record.sends) == (DeliveryState.PENDING, 1, 1)
        assert "database is locked" in record.reason and record.not_before > time.time() + 30
    finally:
        peer.stop()


def test_an_update_from_an_out_of_date_copy_is_refused_even_within_one_clock_tick(tmp_path: Path) -> None:
    clock = Clock()  # stands still: updated_at cannot tell the two copies apart
    outbox = Outbox(tmp_path / "db.sqlite", clock=clock)
    outbox.enqueue(1, _results(tmp_path, 1), ["pacs"])
    [read] = outbox.due()
    current = outbox.sending(read)
    assert current is not None and current.updated_at == read.updated_at
    assert not outbox.retry_later(read, "stale", clock.now + 10)
    assert not outbox.dead(read, "stale")
    assert outbox.retry_later(current, "busy", clock.now + 10)
    [record] = outbox.list()
    assert (record.attempts, record.reason, record.version) == (1, "busy", current.version + 1)
    outbox.close()


def test_records_of_the_previous_schema_gain_a_version_and_take_compare_and_set_updates(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    conn = connect(db)
    migrate(conn, "outbox", _MIGRATIONS[:2])  # sends and timeouts, no version yet
    conn.execute("INSERT INTO outbox (sop_instance_uid, destination, sop_class_uid, study_instance_uid, path, "
                 "job_id, state, attempts, not_before, reason, created_at, updated_at, sends) "
                 "VALUES ('1.2.3', 'pacs', '1.2', '1.2.4', '/x.dcm', 1, 'pending', 1, 0, 'busy', 1, 2, 1)")
    conn.close()
    outbox = Outbox(db)
    [read] = outbox.due()
    assert (read.version, read.sends, read.attempts) == (0, 1, 1)
    current = outbox.sending(read)
    assert current is not None and not outbox.delivered(read) and outbox.delivered(current)
    [record] = outbox.list()
    assert (record.state, record.sends, record.attempts, record.version) == (DeliveryState.DELIVERED, 2, 2, 2)
    outbox.close()

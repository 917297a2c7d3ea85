"""The outbox: one record per (result instance, destination), in the node's SQLite database
(component ``outbox``), so that every result is kept until its destination has taken it.

States::

    pending --sent, success or warning--> delivered
       ^  \\--transient failure (busy, down, refused)--> pending (not before now + backoff)
       |   \\--sent, no response (timeout, abort), unconfirmed sends left--> pending (backoff)
       |    \\--sent, no response, no unconfirmed sends left--> unconfirmed (the PACS may hold it)
       |     \\--data error or permanent rejection, attempts left--> pending (backoff)
       |      \\--data error or permanent rejection, no attempts left--> dead (with the reason)
       +-- retry (operator) -- dead | delivered | unconfirmed

``sends`` counts the C-STORE requests of a record (each counted before it leaves, so a send cut
short by a crash counts too; never reset). ``timeouts`` counts those that got no response since
the record was last queued by a job or retried by an operator.

A job that runs again after a crash enqueues the same instances (their UIDs derive from the
inputs): a record the same job already enqueued keeps its state, so nothing is sent twice. A new
job (the series changed) makes them pending again.

Every change raises a record's ``version``; an update applies only to the version it was given
(compare-and-set), so an update made from an out-of-date copy is refused, never half-applied.
"""

import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from dicom_node.errors import DicomNodeError
from dicom_node.store.db import connect, migrate, transaction

K = TypeVar("K", int, str)  # what the outbox's lookups group records by: job id or SOP Instance UID

_MIGRATIONS = (
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sop_instance_uid TEXT NOT NULL,
        destination TEXT NOT NULL,
        sop_class_uid TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        path TEXT NOT NULL,
        job_id INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before REAL NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        delivered_at REAL NOT NULL DEFAULT 0,
        UNIQUE (sop_instance_uid, destination)
    );
    CREATE INDEX outbox_due ON outbox (state, not_before)
    """,
    # 2: how often each record went out, and how many of those went unanswered
    """
    ALTER TABLE outbox ADD COLUMN sends INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN timeouts INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX outbox_destination_due ON outbox (destination, state, not_before)
    """,
    # 3: a counter every change raises, for the compare-and-set of the updates (updated_at is
    # not one: two changes within one tick of the clock carry the same time)
    """
    ALTER TABLE outbox ADD COLUMN version INTEGER NOT NULL DEFAULT 0
    """,
)
_COLUMNS = ("id, sop_instance_uid, destination, sop_class_uid, study_instance_uid, path, job_id, state, "
            "attempts, not_before, reason, created_at, updated_at, delivered_at, sends, timeouts, version")


_UPSERT = (
    "INSERT INTO outbox (sop_instance_uid, destination, sop_class_uid, study_instance_uid, path, "
    "job_id, state, attempts, not_before, reason, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, '', ?, ?) "
    "ON CONFLICT (sop_instance_uid, destination) DO UPDATE SET path = excluded.path, "
    "job_id = excluded.job_id, state = excluded.state, attempts = 0, timeouts = 0, "
    "not_before = excluded.not_before, reason = '', updated_at = excluded.updated_at, version = version + 1"
)


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"
    UNCONFIRMED = "unconfirmed"  # sent, never answered, given up: the destination may hold it


#: States a record leaves only by an operator's ``retry`` (or a newer job): nothing more is sent by itself.
SETTLED = frozenset({DeliveryState.DELIVERED, DeliveryState.DEAD, DeliveryState.UNCONFIRMED})


class _Changed(Exception):
    """A record changed since it was read (inside :meth:`Outbox.forget`)."""


class OutboxError(DicomNodeError):
    """An operation the record's state does not allow, or a record that does not exist."""


@dataclass(frozen=True)
class OutboxRecord:
    id: int
    sop_instance_uid: str
    destination: str
    sop_class_uid: str
    study_instance_uid: str
    path: str
    job_id: int
    state: DeliveryState
    attempts: int
    not_before: float
    reason: str
    created_at: float
    updated_at: float
    delivered_at: float
    sends: int = 0
    timeouts: int = 0
    version: int = 0  # raised by every change: an update applies only to the version it read


@dataclass(frozen=True)
class Result:
    """One file to deliver."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    path: Path


class Outbox:
    """The outbox records; thread-safe. Policy (when to retry, when to give up) lives in the exporter."""

    def __init__(self, database: Path, clock: Callable[[], float] = time.time,
                 on_enqueue: Callable[[Collection[str]], None] | None = None, *,
                 read_only: bool = False) -> None:
        self._conn = connect(database, read_only=read_only)  # read_only: outbox list on a full disk
        migrate(self._conn, "outbox", _MIGRATIONS)
        self._lock = threading.Lock()
        self.clock = clock
        # wakes the destinations' exporters: a new result need not wait for their poll
        self.on_enqueue = on_enqueue

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn) as conn:
            yield conn

    def enqueue(self, job_id: int, results: Sequence[Result], destinations: Sequence[str]) -> int:
        """Add a record per result and destination; returns how many became pending."""
        now = self.clock()
        count, added = 0, set[str]()
        with self._transaction() as conn:
            for r in results:
                for destination in destinations:
                    row = conn.execute("SELECT job_id FROM outbox WHERE sop_instance_uid = ? "
                                       "AND destination = ?", (r.sop_instance_uid, destination)).fetchone()
                    if row is not None and row[0] >= job_id:
                        continue  # the same job again (after a crash) keeps what was done; an older one loses
                    conn.execute(_UPSERT, (r.sop_instance_uid, destination, r.sop_class_uid,
                                           r.study_instance_uid, str(r.path), job_id, DeliveryState.PENDING,
                                           now, now, now))
                    added.add(destination)
                    count += 1
        if added and self.on_enqueue is not None:
            self.on_enqueue(added)
        return count

    def due(self, limit: int = 500, destination: str | None = None) -> list[OutboxRecord]:
        """Pending records whose time has come (for one destination, or all), oldest first."""
        query = f"SELECT {_COLUMNS} FROM outbox WHERE state = ? AND not_before <= ?"
        args: tuple = (DeliveryState.PENDING, self.clock())
        if destination is not None:
            query, args = query + " AND destination = ?", (*args, destination)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [_record(row) for row in rows]

    def sending(self, record: OutboxRecord) -> OutboxRecord | None:
        """Count a C-STORE of ``record`` before it goes out; returns the record as it is now, for
        the updates that follow, or None if it changed meanwhile (it is not to be sent)."""
        now = self.clock()
        if not self._update("sends = sends + 1, updated_at = ?", (now,), record):
            return None
        return replace(record, sends=record.sends + 1, updated_at=now, version=record.version + 1)

    def delivered(self, record: OutboxRecord, note: str = "") -> bool:
        """Mark ``record`` (as it was read) delivered; False if it changed meanwhile (a newer job
        or an operator reset it), in which case the newer state stands and it is sent again."""
        now = self.clock()
        return self._update(
            "state = ?, attempts = attempts + 1, reason = ?, delivered_at = ?, updated_at = ?",
            (DeliveryState.DELIVERED, note, now, now), record)

    def retry_later(self, record: OutboxRecord, reason: str, not_before: float,
                    timed_out: bool = False) -> bool:
        """Another attempt not before ``not_before``; ``timed_out``: it went out and got no answer."""
        return self._update("attempts = attempts + 1, timeouts = timeouts + ?, reason = ?, not_before = ?, "
                            "updated_at = ?", (int(timed_out), reason, not_before, self.clock()), record)

    def unconfirmed(self, record: OutboxRecord, reason: str) -> bool:
        """Give up a record that went out and was never answered (it is not sent again by itself)."""
        return self._update("state = ?, attempts = attempts + 1, timeouts = timeouts + 1, reason = ?, "
                            "updated_at = ?", (DeliveryState.UNCONFIRMED, reason, self.clock()), record)

    def dead(self, record: OutboxRecord, reason: str) -> bool:
        return self._update("state = ?, attempts = attempts + 1, reason = ?, updated_at = ?",
                            (DeliveryState.DEAD, reason, self.clock()), record)

    def for_jobs(self, job_ids: Collection[int]) -> dict[int, list[OutboxRecord]]:
        """The records each of ``job_ids`` put in the outbox (none: the job sent nothing)."""
        return self._grouped("job_id", job_ids, lambda record: record.job_id)

    def for_instances(self, sop_instance_uids: Collection[str]) -> dict[str, list[OutboxRecord]]:
        """The records of each of ``sop_instance_uids`` (one per destination; none: never queued)."""
        return self._grouped("sop_instance_uid", sop_instance_uids, lambda record: record.sop_instance_uid)

    def _grouped(self, column: str, values: Collection[K], key: Callable[[OutboxRecord], K]
                 ) -> dict[K, list[OutboxRecord]]:
        """The records whose ``column`` is one of ``values``, grouped by ``key``, in id order."""
        wanted = sorted(set(values))
        found: dict[K, list[OutboxRecord]] = {}
        with self._lock:
            for start in range(0, len(wanted), 500):  # SQLite bounds the parameters of one query
                chunk = wanted[start:start + 500]
                rows = self._conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE {column} IN "
                                          f"({', '.join('?' * len(chunk))}) ORDER BY id", chunk).fetchall()
                for row in rows:
                    record = _record(row)
                    found.setdefault(key(record), []).append(record)
        return found

    def forget(self, records: Sequence[OutboxRecord]) -> bool:
        """Delete ``records`` (the retention purge of their result), all or none: only if each is
        still settled and at the version it was read at; False (nothing deleted) otherwise."""
        if any(r.state not in SETTLED for r in records):
            return False
        try:
            with self._transaction() as conn:
                for r in records:
                    cursor = conn.execute("DELETE FROM outbox WHERE id = ? AND version = ?",
                                          (r.id, r.version))
                    if cursor.rowcount != 1:
                        raise _Changed  # rolls back the deletions made before
        except _Changed:
            return False
        return True

    def retry(self, record_id: int) -> OutboxRecord:
        """Send a dead, unconfirmed or delivered record again, now (an operator's action)."""
        with self._transaction() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (record_id,)).fetchone()
            if row is None:
                raise OutboxError(f"no outbox record {record_id}")
            if row[7] == DeliveryState.PENDING:
                raise OutboxError(f"outbox record {record_id} is pending already")
            now = self.clock()
            conn.execute("UPDATE outbox SET state = ?, attempts = 0, timeouts = 0, not_before = ?, "
                         "reason = ?, updated_at = ?, version = version + 1 WHERE id = ?",
                         (DeliveryState.PENDING, now, "retry requested", now, record_id))
        return self.get(record_id)

    def get(self, record_id: int) -> OutboxRecord:
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (record_id,)).fetchone()
        if row is None:
            raise OutboxError(f"no outbox record {record_id}")
        return _record(row)

    def list(self, state: str | None = None, limit: int = 100) -> list[OutboxRecord]:
        query = f"SELECT {_COLUMNS} FROM outbox"
        args: tuple = ()
        if state:
            query, args = query + " WHERE state = ?", (state,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [_record(row) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()
        return {state: count for state, count in rows}

    def _update(self, assignments: str, values: tuple, record: OutboxRecord) -> bool:
        """Apply ``assignments`` if the record is still the version ``record`` was read at."""
        with self._transaction() as conn:
            cursor = conn.execute(f"UPDATE outbox SET {assignments}, version = version + 1 "
                                  "WHERE id = ? AND version = ?", (*values, record.id, record.version))
        return cursor.rowcount == 1


def _record(row: tuple) -> OutboxRecord:
    values = list(row)
    values[7] = DeliveryState(values[7])
    return OutboxRecord(*values)

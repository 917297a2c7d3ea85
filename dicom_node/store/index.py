"""The SQLite index of stored studies, series and instances (component ``store`` of the node's
database; :data:`_MIGRATIONS` brings older files up)."""

import dataclasses
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import NamedTuple

from dicom_node.store.db import connect, connect_read_only, migrate, transaction
from dicom_node.store.keyindex import Backfill, forget_backfill, migrate_to_keys, put_keys, relist_multivalued
from dicom_node.store.keys import Kind
from dicom_node.store.summary import build_summary

logger = logging.getLogger(__name__)

def _built_at_schema_6(conn: sqlite3.Connection) -> None:
    """Schema 5 built ``study_summary``'s first layout; schema 6 drops and builds the current
    one from the records, so building it here too would be done twice."""


_MIGRATIONS = (
    """
    CREATE TABLE studies (
        study_instance_uid TEXT PRIMARY KEY,
        first_received_at REAL NOT NULL,
        last_received_at REAL NOT NULL
    );
    CREATE TABLE series (
        series_instance_uid TEXT PRIMARY KEY,
        study_instance_uid TEXT NOT NULL,
        modality TEXT NOT NULL,
        body_part_examined TEXT NOT NULL,
        series_description TEXT NOT NULL,
        manufacturer TEXT NOT NULL,
        calling_ae_title TEXT NOT NULL,
        first_received_at REAL NOT NULL,
        last_received_at REAL NOT NULL,
        change_seq INTEGER NOT NULL
    );
    CREATE INDEX series_by_study ON series (study_instance_uid);
    CREATE UNIQUE INDEX series_by_change ON series (change_seq);
    CREATE TABLE instances (
        sop_instance_uid TEXT PRIMARY KEY,
        sop_class_uid TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        modality TEXT NOT NULL,
        body_part_examined TEXT NOT NULL,
        series_description TEXT NOT NULL,
        calling_ae_title TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        path TEXT NOT NULL,
        received_at REAL NOT NULL,
        times_received INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX instances_by_series ON instances (series_instance_uid);
    """,
    # 2: a series is keyed by its study AND its Series Instance UID (two patients' studies may
    # share a Series Instance UID, by error or by attack). Series records are rebuilt from the
    # instances. A record keeps its change number when no other study holds its Series Instance
    # UID; each (study, series) pair of a UID that several studies hold gets a new, higher one,
    # so the scheduler makes a job for it with its own study's instances only. Records and
    # studies without instances go. Manufacturer (the loop guard reads it) comes only from the
    # old record of the same study: another study's is not evidence, so such a pair gets ''.
    """
    CREATE TABLE series_v2 (
        series_instance_uid TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        modality TEXT NOT NULL,
        body_part_examined TEXT NOT NULL,
        series_description TEXT NOT NULL,
        manufacturer TEXT NOT NULL,
        calling_ae_title TEXT NOT NULL,
        first_received_at REAL NOT NULL,
        last_received_at REAL NOT NULL,
        change_seq INTEGER NOT NULL,
        PRIMARY KEY (study_instance_uid, series_instance_uid)
    );
    INSERT INTO series_v2
        SELECT s.series_instance_uid, s.study_instance_uid, s.modality, s.body_part_examined,
               s.series_description, s.manufacturer, s.calling_ae_title, s.first_received_at,
               s.last_received_at, s.change_seq
        FROM series s WHERE EXISTS (SELECT 1 FROM instances i WHERE
            i.study_instance_uid = s.study_instance_uid AND i.series_instance_uid = s.series_instance_uid)
        AND NOT EXISTS (SELECT 1 FROM instances i WHERE
            i.series_instance_uid = s.series_instance_uid AND i.study_instance_uid != s.study_instance_uid);
    INSERT INTO series_v2
        SELECT i.series_instance_uid, i.study_instance_uid, min(i.modality), min(i.body_part_examined),
               min(i.series_description), coalesce(min(s.manufacturer), ''), min(i.calling_ae_title),
               min(i.received_at), max(i.received_at),
               (SELECT coalesce(max(change_seq), 0) FROM series)
                   + row_number() OVER (ORDER BY max(i.received_at), i.study_instance_uid)
        FROM instances i LEFT JOIN series s ON s.series_instance_uid = i.series_instance_uid
            AND s.study_instance_uid = i.study_instance_uid
        WHERE NOT EXISTS (SELECT 1 FROM series_v2 n WHERE
            n.study_instance_uid = i.study_instance_uid AND n.series_instance_uid = i.series_instance_uid)
        GROUP BY i.study_instance_uid, i.series_instance_uid;
    DROP TABLE series;
    ALTER TABLE series_v2 RENAME TO series;
    CREATE UNIQUE INDEX series_by_change ON series (change_seq);
    CREATE INDEX series_by_uid ON series (series_instance_uid);
    DROP INDEX instances_by_series;
    CREATE INDEX instances_by_series ON instances (study_instance_uid, series_instance_uid);
    DELETE FROM studies WHERE NOT EXISTS (
        SELECT 1 FROM instances i WHERE i.study_instance_uid = studies.study_instance_uid)
    """,
    # 3: the query keys of inputs and results (C-FIND), read from the stored files' headers
    migrate_to_keys,
    # 4: multi-valued keys written as "[a, b]" before: read those files again ("a\\b")
    relist_multivalued,
    # 5: a record per study of what a STUDY-level search answers, kept by triggers (its first
    # layout; schema 6 builds the current one, so a store still at 4 builds it once, there)
    _built_at_schema_6,
    # 6: the same with a holder count per attribute and a record per study and modality (no
    # delete or new series reads the whole study); rebuilt from the records
    build_summary,
)


def _record_keys(record: "InstanceRecord") -> dict[str, object]:
    """The keys an instance record itself holds (the ones the node routes by win)."""
    return {"sop_instance_uid": record.sop_instance_uid, "sop_class_uid": record.sop_class_uid,
            "study_instance_uid": record.study_instance_uid,
            "series_instance_uid": record.series_instance_uid,
            "modality": record.modality, "series_description": record.series_description}


def studies_of(conn: sqlite3.Connection, sop_instance_uids: Sequence[str]) -> list[str]:
    """The studies (sorted) that hold any of the instances, on ``conn``: for another component's
    migration, which runs on its own connection before an :class:`Index` exists (the ``instances``
    table is the same in every schema version)."""
    found: set[str] = set()
    uids = list(sop_instance_uids)
    for start in range(0, len(uids), 500):  # SQLite's bound on parameters per statement
        chunk = uids[start:start + 500]
        rows = conn.execute("SELECT DISTINCT study_instance_uid FROM instances WHERE sop_instance_uid "
                            f"IN ({', '.join('?' * len(chunk))})", chunk).fetchall()
        found.update(row[0] for row in rows)
    return sorted(found)


class SeriesKey(NamedTuple):
    """A series as the node knows it: its study and its Series Instance UID together.

    A Series Instance UID alone is not a key: two studies (even of two patients) may carry the
    same one, by a modality's error or by a peer's design, and must never be mixed.
    """

    study_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance, as indexed. ``path`` is relative to ``<data_dir>/instances``."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    calling_ae_title: str
    size_bytes: int
    path: str
    received_at: float
    times_received: int = 1

    @property
    def series_key(self) -> SeriesKey:
        return SeriesKey(self.study_instance_uid, self.series_instance_uid)


@dataclass(frozen=True)
class SeriesRecord:
    """One series, with the attributes routing reads and its instance count."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    manufacturer: str
    calling_ae_title: str
    first_received_at: float
    last_received_at: float
    change_seq: int  # grows with every change of the series' instances; unique across series
    instance_count: int

    @property
    def key(self) -> SeriesKey:
        return SeriesKey(self.study_instance_uid, self.series_instance_uid)


@dataclass(frozen=True)
class Indexed:
    """What :meth:`Index.put` did.

    Attributes
    ----------
    record
        The instance's record as stored.
    replaced
        The record it replaced (the same SOP Instance UID stored before), or None.
    other_studies
        When this put created the series' record: the other studies that already hold a series
        with the same Series Instance UID (sorted); empty otherwise.
    """

    record: InstanceRecord
    replaced: InstanceRecord | None
    other_studies: tuple[str, ...] = ()


_INSTANCE_COLUMNS = ", ".join(f.name for f in fields(InstanceRecord))
_SAME_SERIES = "study_instance_uid = ? AND series_instance_uid = ?"


class Index:
    """Records of stored instances; safe to share between the SCP's association threads."""

    def __init__(self, path: Path, synchronous: str = "FULL", *, read_only: bool = False) -> None:
        self._conn = connect(path, synchronous, read_only=read_only)  # read_only: purge --dry-run
        migrate(self._conn, "store", _MIGRATIONS)
        self._lock = threading.Lock()
        if not read_only:
            self._backfill(path.parent)
        # C-FIND and retrieves read on their own connection (WAL: readers never wait for the
        # writer), so a long query does not hold up the C-STOREs being indexed meanwhile
        self._reader = connect_read_only(path)
        self._reader_lock = threading.Lock()

    def _backfill(self, data_dir: Path) -> None:
        """Read the query keys of the files a migration listed (schema 3: every file; schema 4:
        those with a multi-valued key held in the old text), a batch per transaction, logging
        progress (a large store takes minutes; a kill resumes) and how many could not be read."""
        backfill = Backfill(data_dir)
        pending = Backfill.pending(self._conn)
        if not pending:
            return
        (total,) = self._conn.execute("SELECT count(*) FROM keys_backfill").fetchone()
        done, unreadable, logged = 0, 0, time.monotonic()
        while pending:
            found = backfill.read(pending)
            with self._lock, transaction(self._conn) as conn:
                Backfill.apply(conn, found)
            done += len(found)
            unreadable += sum(values is None for _, _, values, _, _ in found)
            if time.monotonic() - logged >= 5.0:
                logger.info("store: read the query keys of %d of %d file(s)", done, total)
                logged = time.monotonic()
            pending = Backfill.pending(self._conn)
        logger.info("store: the query keys of %d file(s) are indexed", done - unreadable)
        if unreadable:
            logger.warning("store: %d file(s) could not be read (gone or not DICOM): their records keep "
                           "the keys they had (a multi-valued one as its old '[a, b]' text)", unreadable)

    def close(self) -> None:
        with self._reader_lock:
            self._reader.close()
        with self._lock:
            self._conn.close()

    def put(
        self, record: InstanceRecord, manufacturer: str, clock: Callable[[], float] | None = None,
        keys: Mapping[str, object] | None = None,
    ) -> Indexed:
        """Insert or replace an instance record; say what it replaced and whether its Series
        Instance UID is now held by several studies.

        With ``clock``, the record's ``received_at`` is taken inside the transaction, so arrival
        times follow commit order. Every put gives the series a new, higher ``change_seq``. An
        instance that moves (the same SOP Instance UID under another study or series) leaves
        its old series changed too (a new ``change_seq``, so its jobs are made again without
        it), and the old series' and study's records go when nothing is left in them.
        ``keys`` (:func:`dicom_node.store.keys.key_values`) are its query keys; without them
        only what the record holds is searchable.
        """
        with self._lock, transaction(self._conn) as conn:
            old = self._get(record.sop_instance_uid)
            record = dataclasses.replace(
                record, times_received=old.times_received + 1 if old else 1,
                received_at=clock() if clock is not None else record.received_at,
            )
            conn.execute(
                f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLUMNS}) "
                f"VALUES ({', '.join('?' * len(fields(InstanceRecord)))})",
                astuple(record),
            )
            created = self._upsert_series(record, manufacturer)
            put_keys(conn, Kind.INPUT, f"instances/{record.path}", record.transfer_syntax_uid,
                     record.received_at, {**(keys or {}), **_record_keys(record)})
            conn.execute(
                "INSERT INTO studies VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET "
                "last_received_at = max(last_received_at, excluded.last_received_at)",
                (record.study_instance_uid, record.received_at, record.received_at),
            )
            if old is not None and old.series_key != record.series_key:
                self._instance_left(old.series_key, record.received_at)
            others = self._other_studies(record.series_key) if created else ()
        return Indexed(record, old, others)

    def put_result(self, path: str, transfer_syntax_uid: str, received_at: float,
                   keys: Mapping[str, object]) -> None:
        """Index a result the node wrote (``path`` relative to the data folder), replacing an
        earlier record of the same SOP Instance UID (a re-run writes the same UIDs)."""
        with self._lock, transaction(self._conn) as conn:
            put_keys(conn, Kind.RESULT, path, transfer_syntax_uid, received_at, keys)

    def remove_result(self, sop_instance_uid: str, path: str | None = None) -> bool:
        """Forget a result's keys (its file is being deleted), only the record of ``path`` (relative
        to the data folder) if given; True if it was indexed. Inputs' keys go with their
        ``instances`` record by themselves (a trigger)."""
        where = "sop_instance_uid = ? AND kind = ?" + (" AND path = ?" if path is not None else "")
        args = (sop_instance_uid, Kind.RESULT.value, *((path,) if path is not None else ()))
        with self._lock, transaction(self._conn) as conn:
            for (listed,) in conn.execute(f"SELECT path FROM instance_keys WHERE {where}", args).fetchall():
                forget_backfill(conn, listed)
            if path is not None:
                forget_backfill(conn, path)  # a result file the backfill has yet to read
            cursor = conn.execute(f"DELETE FROM instance_keys WHERE {where}", args)
        return cursor.rowcount > 0

    def find(self, sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
        """The rows of a read-only query of ``instance_keys`` and ``study_summary`` (as built by
        :mod:`dicom_node.query.match`); read in one snapshot, on a read-only connection (a
        statement that would write fails)."""
        with self._reader_lock:
            return self._reader.execute(sql, tuple(params)).fetchall()

    def _next_change(self) -> int:
        (seq,) = self._conn.execute("SELECT coalesce(max(change_seq), 0) + 1 FROM series").fetchone()
        return int(seq)

    def _upsert_series(self, r: InstanceRecord, manufacturer: str) -> bool:
        """Record the instance's arrival in its series; True if the series' record is new."""
        exists = self._conn.execute(
            f"SELECT 1 FROM series WHERE {_SAME_SERIES}", r.series_key).fetchone() is not None
        self._conn.execute(
            "INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (study_instance_uid, series_instance_uid) DO UPDATE SET "
            "last_received_at = max(last_received_at, excluded.last_received_at), "
            "change_seq = excluded.change_seq",
            (
                r.series_instance_uid, r.study_instance_uid, r.modality, r.body_part_examined,
                r.series_description, manufacturer, r.calling_ae_title,
                r.received_at, r.received_at, self._next_change(),
            ),
        )
        return not exists

    def _instance_left(self, key: SeriesKey, now: float) -> None:
        """An instance moved out of series ``key``: drop what is left empty, else mark it changed."""
        conn = self._conn
        (left,) = conn.execute(f"SELECT count(*) FROM instances WHERE {_SAME_SERIES}", key).fetchone()
        if left == 0:
            conn.execute(f"DELETE FROM series WHERE {_SAME_SERIES}", key)
        else:
            # its set of instances changed: the scheduler looks at it again once it is quiet
            conn.execute(
                "UPDATE series SET change_seq = ?, last_received_at = max(last_received_at, ?) "
                f"WHERE {_SAME_SERIES}", (self._next_change(), now, *key))
        conn.execute(
            "DELETE FROM studies WHERE study_instance_uid = ? AND NOT EXISTS "
            "(SELECT 1 FROM instances i WHERE i.study_instance_uid = studies.study_instance_uid)",
            (key.study_instance_uid,))

    def _other_studies(self, key: SeriesKey) -> tuple[str, ...]:
        rows = self._conn.execute(
            "SELECT study_instance_uid FROM series WHERE series_instance_uid = ? "
            "AND study_instance_uid != ? ORDER BY study_instance_uid",
            (key.series_instance_uid, key.study_instance_uid)).fetchall()
        return tuple(row[0] for row in rows)

    def _get(self, sop_instance_uid: str) -> InstanceRecord | None:
        row = self._conn.execute(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        ).fetchone()
        return InstanceRecord(*row) if row else None

    def get(self, sop_instance_uid: str) -> InstanceRecord | None:
        """The record of one instance, or None."""
        with self._lock:
            return self._get(sop_instance_uid)

    def studies_of(self, sop_instance_uids: Sequence[str]) -> list[str]:
        """The studies (sorted) that now hold any of the instances; unknown UIDs are left out."""
        with self._lock:
            return studies_of(self._conn, sop_instance_uids)

    def instances(self, series: SeriesKey | None = None) -> list[InstanceRecord]:
        """All instance records, or those of one series (of one study), in order of receipt."""
        query = f"SELECT {_INSTANCE_COLUMNS} FROM instances"
        args: tuple[str, ...] = ()
        if series is not None:
            query += f" WHERE {_SAME_SERIES}"
            args = (series.study_instance_uid, series.series_instance_uid)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY received_at", args).fetchall()
        return [InstanceRecord(*row) for row in rows]

    def series(self, study_instance_uid: str | None = None) -> list[SeriesRecord]:
        """Series records with their instance counts, or those of one study."""
        if study_instance_uid is None:
            return self._series("1", (), "s.first_received_at")
        return self._series("s.study_instance_uid = ?", (study_instance_uid,), "s.first_received_at")

    def series_changed_since(self, change_seq: int) -> list[SeriesRecord]:
        """Series that changed (an instance stored in or moved out of them) after ``change_seq``,
        in order of their last change."""
        return self._series("s.change_seq > ?", (change_seq,), "s.change_seq")

    def _series(self, where: str, args: tuple[object, ...], order: str) -> list[SeriesRecord]:
        query = (
            "SELECT s.*, (SELECT count(*) FROM instances i "
            "WHERE i.study_instance_uid = s.study_instance_uid "
            "AND i.series_instance_uid = s.series_instance_uid) FROM series s "
            f"WHERE {where} ORDER BY {order}"
        )
        with self._lock:
            rows = self._conn.execute(query, args).fetchall()
        return [SeriesRecord(*row) for row in rows]

    def counts(self) -> tuple[int, int, int]:
        """Numbers of studies, series and instances indexed."""
        with self._lock:
            studies, series, instances = (
                self._conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("studies", "series", "instances")
            )
        return studies, series, instances

    def received_before(self, cutoff: float, after: tuple[float, str] = (float("-inf"), ""),
                        limit: int = 500) -> list[InstanceRecord]:
        """Up to ``limit`` records received before ``cutoff``, oldest first, that come after
        ``after`` (the ``(received_at, sop_instance_uid)`` of the last one of the previous page)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE received_at < ? "
                "AND (received_at, sop_instance_uid) > (?, ?) "
                "ORDER BY received_at, sop_instance_uid LIMIT ?", (cutoff, *after, limit)).fetchall()
        return [InstanceRecord(*row) for row in rows]

    def remove(self, record: InstanceRecord) -> bool:
        """Delete ``record`` if the index still holds it as read (same path, same arrival): a copy
        received again meanwhile stays. Its series and study go when nothing is left in them.

        Unlike an instance that moves, a removal does not mark the series changed: what is left
        of it is not analysed again for having lost an instance to the retention policy.
        """
        with self._lock, transaction(self._conn) as conn:
            cursor = conn.execute(
                "DELETE FROM instances WHERE sop_instance_uid = ? AND path = ? AND received_at = ?",
                (record.sop_instance_uid, record.path, record.received_at))
            if cursor.rowcount != 1:
                return False
            key = record.series_key
            conn.execute(f"DELETE FROM series WHERE {_SAME_SERIES} AND NOT EXISTS (SELECT 1 FROM instances i "
                         "WHERE i.study_instance_uid = series.study_instance_uid "
                         "AND i.series_instance_uid = series.series_instance_uid)", key)
            conn.execute("DELETE FROM studies WHERE study_instance_uid = ? AND NOT EXISTS (SELECT 1 FROM "
                         "instances i WHERE i.study_instance_uid = studies.study_instance_uid)",
                         (key.study_instance_uid,))
        return True

    def result_paths(self) -> list[str]:
        """The paths (relative to the data folder) of every indexed result."""
        return [path for path, _ in self.results()]

    def results(self) -> list[tuple[str, str]]:
        """(path relative to the data folder, SOP Instance UID) of every indexed result."""
        with self._lock:
            rows = self._conn.execute("SELECT path, sop_instance_uid FROM instance_keys WHERE kind = ?",
                                      (Kind.RESULT.value,)).fetchall()
        return [(row[0], row[1]) for row in rows]

    def paths(self) -> Iterator[tuple[str, str]]:
        """(path, SOP Instance UID) of every indexed instance."""
        with self._lock:
            rows = self._conn.execute("SELECT path, sop_instance_uid FROM instances").fetchall()
        yield from rows

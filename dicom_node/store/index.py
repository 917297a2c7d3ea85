"""The SQLite index of stored studies, series and instances (component ``store`` of the node's
database; :data:`_MIGRATIONS` brings older files up)."""

import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from dicom_node.store.db import connect, migrate

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
)


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
    change_seq: int  # grows with every instance stored in the series; unique across series
    instance_count: int


_INSTANCE_COLUMNS = ", ".join(f.name for f in fields(InstanceRecord))


class Index:
    """Records of stored instances; safe to share between the SCP's association threads."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self._conn = connect(path, synchronous)
        migrate(self._conn, "store", _MIGRATIONS)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def put(
        self, record: InstanceRecord, manufacturer: str, clock: Callable[[], float] | None = None
    ) -> tuple[InstanceRecord, InstanceRecord | None]:
        """Insert or replace an instance record; return it as stored and the record it replaced.

        With ``clock``, the record's ``received_at`` is taken inside the transaction, so arrival
        times follow commit order. Every put gives the series a new, higher ``change_seq``.
        """
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
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
                self._upsert_series(record, manufacturer)
                conn.execute(
                    "INSERT INTO studies VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET "
                    "last_received_at = max(last_received_at, excluded.last_received_at)",
                    (record.study_instance_uid, record.received_at, record.received_at),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return record, old

    def _upsert_series(self, r: InstanceRecord, manufacturer: str) -> None:
        (seq,) = self._conn.execute("SELECT coalesce(max(change_seq), 0) + 1 FROM series").fetchone()
        self._conn.execute(
            "INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
            "last_received_at = max(last_received_at, excluded.last_received_at), "
            "change_seq = excluded.change_seq",
            (
                r.series_instance_uid, r.study_instance_uid, r.modality, r.body_part_examined,
                r.series_description, manufacturer, r.calling_ae_title,
                r.received_at, r.received_at, seq,
            ),
        )

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

    def instances(self, series_instance_uid: str | None = None) -> list[InstanceRecord]:
        """All instance records, or those of one series, in order of receipt."""
        query = f"SELECT {_INSTANCE_COLUMNS} FROM instances"
        args: tuple[str, ...] = ()
        if series_instance_uid is not None:
            query += " WHERE series_instance_uid = ?"
            args = (series_instance_uid,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY received_at", args).fetchall()
        return [InstanceRecord(*row) for row in rows]

    def series(self, study_instance_uid: str | None = None) -> list[SeriesRecord]:
        """Series records with their instance counts, or those of one study."""
        if study_instance_uid is None:
            return self._series("1", (), "s.first_received_at")
        return self._series("s.study_instance_uid = ?", (study_instance_uid,), "s.first_received_at")

    def series_changed_since(self, change_seq: int) -> list[SeriesRecord]:
        """Series that stored an instance after ``change_seq``, in order of their last change."""
        return self._series("s.change_seq > ?", (change_seq,), "s.change_seq")

    def _series(self, where: str, args: tuple[object, ...], order: str) -> list[SeriesRecord]:
        query = (
            "SELECT s.*, (SELECT count(*) FROM instances i "
            f"WHERE i.series_instance_uid = s.series_instance_uid) FROM series s "
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

    def paths(self) -> Iterator[tuple[str, str]]:
        """(path, SOP Instance UID) of every indexed instance."""
        with self._lock:
            rows = self._conn.execute("SELECT path, sop_instance_uid FROM instances").fetchall()
        yield from rows

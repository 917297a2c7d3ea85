"""The ``instance_keys`` table: one record per SOP Instance UID stored as an input or written as a
result (the result's when both hold it), with the query keys of :mod:`dicom_node.store.keys`;
what C-FIND (and later QIDO-RS) searches.

Inputs keep their record in ``instances`` (jobs and routing read it) and their keys here, both
written in one transaction by :meth:`dicom_node.store.index.Index.put`; a trigger removes the keys
of an input whose ``instances`` record goes, so whatever deletes inputs keeps the two in step.
Results have keys only (they are not routed). ``path`` is relative to the data folder.
"""

import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from pydicom import dcmread

from dicom_node.store.db import database_file
from dicom_node.store.keys import KEY_COLUMNS, KEY_TAGS, Kind, key_row, key_values

logger = logging.getLogger(__name__)

#: Columns of ``instance_keys`` besides the keys.
_OWN_COLUMNS = ("kind", "path", "transfer_syntax_uid", "received_at")
COLUMNS = (*_OWN_COLUMNS, *KEY_COLUMNS)
_INSERT = (f"INSERT INTO instance_keys ({', '.join(COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(COLUMNS))})")

#: The indexes C-FIND needs: the unique key of each level, and the keys peers search by most.
_INDEXES = (
    ("keys_by_study", "study_instance_uid, series_instance_uid"),
    ("keys_by_patient", "patient_id"),
    ("keys_by_patient_name", "patient_name COLLATE NOCASE"),
    ("keys_by_study_date", "study_date"),
    ("keys_by_accession", "accession_number"),
    ("keys_by_series", "series_instance_uid"),
)


def create_key_table(conn: sqlite3.Connection) -> None:
    """Create ``instance_keys``, its indexes and the trigger that follows ``instances``."""
    columns = ", ".join(
        f"{name} {'INTEGER' if name in ('series_number', 'instance_number') else 'TEXT'}"
        for name in KEY_COLUMNS if name != "sop_instance_uid")
    conn.execute(f"CREATE TABLE instance_keys (sop_instance_uid TEXT PRIMARY KEY, kind TEXT NOT NULL, "
                 f"path TEXT NOT NULL, transfer_syntax_uid TEXT NOT NULL, received_at REAL NOT NULL, "
                 f"{columns})")
    for name, columns_ in _INDEXES:
        conn.execute(f"CREATE INDEX {name} ON instance_keys ({columns_})")
    conn.execute("CREATE TRIGGER instance_keys_follow_instances AFTER DELETE ON instances BEGIN "
                 "DELETE FROM instance_keys WHERE sop_instance_uid = old.sop_instance_uid "
                 "AND kind = 'input'; END")


def put_keys(conn: sqlite3.Connection, kind: Kind, path: str, transfer_syntax_uid: str, received_at: float,
             values: Mapping[str, object]) -> None:
    """Insert or replace one record (the caller holds the transaction); fresher than what the
    schema-3 backfill may have read of the same file, so that file leaves its list.

    One record per SOP Instance UID: the node's own result wins over an input of the same UID (a
    PACS forwarding the node's outputs back to it), so purging that input (whose record a trigger
    deletes) never hides the result from C-FIND.

    The record it replaces is deleted first, not by ``INSERT OR REPLACE``: SQLite's REPLACE
    fires no delete trigger, and ``study_summary``'s triggers must see the old record go
    (:mod:`dicom_node.store.summary`)."""
    forget_backfill(conn, path)
    row = key_row(values)
    sop_instance_uid = row[KEY_COLUMNS.index("sop_instance_uid")]
    held = conn.execute("SELECT kind FROM instance_keys WHERE sop_instance_uid = ?",
                        (sop_instance_uid,)).fetchone()
    if held is not None:
        if kind == Kind.INPUT and held[0] == Kind.RESULT.value:
            return
        conn.execute("DELETE FROM instance_keys WHERE sop_instance_uid = ?", (sop_instance_uid,))
    conn.execute(_INSERT, (kind.value, path, transfer_syntax_uid, received_at, *row))


def migrate_to_keys(conn: sqlite3.Connection) -> None:
    """Schema 3: create ``instance_keys`` with a record per indexed input holding what its
    ``instances`` record knows (UIDs, modality, series description), and list in
    ``keys_backfill`` every file whose header is still to read: each input, and each result file
    under ``results/``. Reading them is :class:`Backfill`'s work, in batches that commit, so the
    migration's own transaction is short and a killed start resumes where it stopped."""
    create_key_table(conn)
    conn.execute("CREATE TABLE IF NOT EXISTS keys_backfill (path TEXT PRIMARY KEY, kind TEXT NOT NULL)")
    conn.execute("INSERT INTO instance_keys (kind, path, transfer_syntax_uid, received_at, sop_instance_uid, "
                 "sop_class_uid, study_instance_uid, series_instance_uid, modality, series_description) "
                 f"SELECT '{Kind.INPUT.value}', 'instances/' || path, transfer_syntax_uid, received_at, "
                 "sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, modality, "
                 "series_description FROM instances")
    conn.execute(f"INSERT INTO keys_backfill SELECT path, '{Kind.INPUT.value}' FROM instance_keys")
    data_dir = _data_dir(conn)
    results = data_dir / "results" if data_dir is not None else None
    if data_dir is not None and results is not None and results.is_dir():
        conn.executemany(f"INSERT OR IGNORE INTO keys_backfill VALUES (?, '{Kind.RESULT.value}')",
                         ((str(file.relative_to(data_dir)),) for file in sorted(results.glob("*/*/*.dcm"))))
    (count,) = conn.execute("SELECT count(*) FROM keys_backfill").fetchone()
    if count:
        logger.info("store schema 3: %d stored file(s) to read the query keys of, in batches", count)
    else:
        conn.execute("DROP TABLE keys_backfill")  # a new store: nothing to read


def relist_multivalued(conn: sqlite3.Connection) -> None:
    """Schema 4: list for :class:`Backfill` the files whose record holds a multi-valued key as
    the text of a Python list ("[Doe^John, Roe^Jane]", as versions before it wrote them); the
    backfill reads them again and writes the values joined by ``\\``."""
    text = [c for c in KEY_COLUMNS if c not in ("series_number", "instance_number")]
    where = " OR ".join(f"{column} LIKE '[%]'" for column in text)
    rows = conn.execute(f"SELECT path, kind FROM instance_keys WHERE {where}").fetchall()
    if not rows:
        return
    conn.execute("CREATE TABLE IF NOT EXISTS keys_backfill (path TEXT PRIMARY KEY, kind TEXT NOT NULL)")
    conn.executemany("INSERT OR IGNORE INTO keys_backfill VALUES (?, ?)", rows)
    logger.info("store schema 4: %d record(s) with a multi-valued key to read again", len(rows))


#: A file's keys as read: (path, kind, key values or None if unreadable, transfer syntax, mtime).
Read = tuple[str, Kind, dict[str, object] | None, str, float]


class Backfill:
    """The schema-3 migration's reading of stored files' headers, a batch at a time: the files
    still to read are listed in ``keys_backfill`` (gone once all are read), so a start killed
    halfway goes on from where it stopped; until then queries see only the records' own keys."""

    BATCH = 200

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    @staticmethod
    def pending(conn: sqlite3.Connection) -> list[tuple[str, Kind]]:
        """Up to :attr:`BATCH` (path, kind) still to read; [] when done (or never needed)."""
        if not _listed(conn):
            return []
        rows = conn.execute("SELECT path, kind FROM keys_backfill ORDER BY path LIMIT ?",
                            (Backfill.BATCH,)).fetchall()
        return [(path, Kind(kind)) for path, kind in rows]

    def read(self, pending: list[tuple[str, Kind]]) -> list[Read]:
        """The files' keys (outside any transaction: reading files is the slow part)."""
        found: list[Read] = []
        for path, kind in pending:
            values, syntax = _read_keys(self.data_dir / path)
            try:
                mtime = (self.data_dir / path).stat().st_mtime
            except OSError:
                mtime = 0.0
            found.append((path, kind, values, syntax, mtime))
        return found

    @staticmethod
    def apply(conn: sqlite3.Connection, found: list[Read]) -> None:
        """Write what :meth:`read` found for the files still listed (a C-STORE or a result written
        meanwhile took its file off the list, with fresher keys), then drop the list if empty."""
        for path, kind, values, syntax, mtime in found:
            listed = conn.execute("DELETE FROM keys_backfill WHERE path = ?", (path,)).rowcount
            if not listed or values is None:
                continue  # written live meanwhile, or gone or unreadable: the record keeps what it knows
            if kind is Kind.RESULT:
                if values.get("sop_instance_uid"):
                    put_keys(conn, kind, path, syntax, mtime, values)
                continue
            row = conn.execute("SELECT sop_instance_uid, study_instance_uid, series_instance_uid, "
                               "received_at, transfer_syntax_uid FROM instance_keys WHERE path = ? "
                               "AND kind = ?", (path, Kind.INPUT.value)).fetchone()
            if row is None:
                continue  # purged meanwhile
            # the record's UIDs are the ones the node routes by: they win over a file edited since
            values.update(sop_instance_uid=row[0], study_instance_uid=row[1], series_instance_uid=row[2])
            put_keys(conn, kind, path, row[4], row[3], values)
        if conn.execute("SELECT 1 FROM keys_backfill LIMIT 1").fetchone() is None:
            conn.execute("DROP TABLE keys_backfill")


def forget_backfill(conn: sqlite3.Connection, path: str) -> None:
    """Take a file off the backfill's list (the caller holds the transaction): its keys were
    written live, or it is being deleted; the backfill must not write what it read before."""
    if _listed(conn):
        conn.execute("DELETE FROM keys_backfill WHERE path = ?", (path,))


def _listed(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_schema WHERE name = 'keys_backfill'").fetchone() is not None


def _read_keys(path: Path) -> tuple[dict[str, object] | None, str]:
    """A file's key values and transfer syntax; (None, '') when it is missing or unreadable."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(KEY_TAGS))
        return key_values(ds), str(ds.file_meta.get("TransferSyntaxUID", ""))
    except Exception:  # a missing or unreadable file: its keys are unknown
        return None, ""


def _data_dir(conn: sqlite3.Connection) -> Path | None:
    file = database_file(conn)
    return file.parent if file is not None else None

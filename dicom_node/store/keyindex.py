"""The ``instance_keys`` table: one record per stored input and per result the node wrote, with
the query keys of :mod:`dicom_node.store.keys`; what C-FIND (and later QIDO-RS) searches.

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
_INSERT = (f"INSERT OR REPLACE INTO instance_keys ({', '.join(COLUMNS)}) "
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
    """Insert or replace one record (the caller holds the transaction)."""
    conn.execute(_INSERT, (kind.value, path, transfer_syntax_uid, received_at, *key_row(values)))


def migrate_to_keys(conn: sqlite3.Connection) -> None:
    """Schema 3: create ``instance_keys`` and fill it from the stored files' headers: every
    indexed input (NULL keys but its UIDs where its file is gone or unreadable) and every result
    file under ``results/``."""
    create_key_table(conn)
    data_dir = _data_dir(conn)
    rows = conn.execute("SELECT sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, "
                        "transfer_syntax_uid, modality, series_description, path, received_at "
                        "FROM instances").fetchall()
    if rows:
        logger.info("store schema 3: reading the query keys of %d stored instance(s), once", len(rows))
    for sop, sop_class, study, series, syntax, modality, description, path, received in rows:
        values = _read_keys(data_dir / "instances" / path)[0] if data_dir else None
        if values is None:
            values = {"sop_instance_uid": sop, "sop_class_uid": sop_class, "study_instance_uid": study,
                      "series_instance_uid": series, "modality": modality, "series_description": description}
        # the record's UIDs are the ones the node routes by: they win over a file edited since
        values.update(sop_instance_uid=sop, study_instance_uid=study, series_instance_uid=series)
        put_keys(conn, Kind.INPUT, f"instances/{path}", syntax, received, values)
    if data_dir is not None:
        _index_result_files(conn, data_dir)


def _index_result_files(conn: sqlite3.Connection, data_dir: Path) -> None:
    results = data_dir / "results"
    count = 0
    for file in sorted(results.glob("*/*/*.dcm")) if results.is_dir() else []:
        values, syntax = _read_keys(file)
        if values is None or not values.get("sop_instance_uid"):
            logger.warning("result file %s is unreadable; not indexed", file.relative_to(data_dir))
            continue
        put_keys(conn, Kind.RESULT, str(file.relative_to(data_dir)), syntax, file.stat().st_mtime, values)
        count += 1
    if count:
        logger.info("indexed %d result file(s) written before the upgrade", count)


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

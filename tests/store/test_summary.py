"""``study_summary`` (store schema 5, its layout of schema 6) equals what grouping every
``instance_keys`` record gave (:mod:`tests.store.summary_reference`, the query module's SQL
before it), whatever writes the records: C-STORE puts, re-stores (same values, other values,
another series or study), results (one of an input's UID wins over it), retention removals,
result removals, the trigger that follows ``instances``; and a schema-4 store, or one with the
summary's first layout, migrates to it."""

import random
import sqlite3
from pathlib import Path

import pytest

from dicom_node.store import index as index_module
from dicom_node.store.db import connect, migrate, schema_version, transaction
from dicom_node.store.index import Index
from dicom_node.store.keyindex import put_keys
from dicom_node.store.keys import Kind
from tests.store.summary_reference import grouped, summarised, wrong_holders
from tests.store.summary_writes import MODALITIES, STUDIES, keys, record, step


def assert_summarised(index: Index) -> None:
    conn = index._conn
    assert summarised(conn) == grouped(conn)
    assert wrong_holders(conn) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_summary_equals_the_grouped_records_after_random_writes(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    index = Index(tmp_path / "index.sqlite", "NORMAL")
    try:
        for n in range(600):
            step(index, rng, float(n))
            if n % 25 == 0:
                assert_summarised(index)
        assert_summarised(index)
        assert len(grouped(index._conn)) == len(STUDIES)  # the writes reached every study
        for stored in index.instances():  # the retention purge's path, to the last record
            assert index.remove(stored)
        for path, sop in index.results():
            assert index.remove_result(sop, path)
        assert_summarised(index)
        assert summarised(index._conn) == []
        assert index._conn.execute("SELECT count(*) FROM study_summary_series").fetchone() == (0,)
    finally:
        index.close()


def test_a_series_of_several_modalities_lists_them_in_the_order_grouping_did(tmp_path: Path) -> None:
    """Modalities in Study is ordered by series, then by record: a new first record of a later
    modality, or the deletion of the first record of one, reorders the list."""
    index = Index(tmp_path / "index.sqlite", "NORMAL")
    rng = random.Random(7)
    try:
        writes = [("2.25.1.5", "1", "MR"), ("2.25.1.5", "2", "CT"), ("2.25.1.3", "3", "CT"),
                  ("2.25.1.3", "4", "MR"), ("2.25.1.1", "5", "SR"), ("2.25.1.3", "6", "MR")]
        for series, sop, modality in writes:
            index.put(record("2.25.1", series, f"2.25.7.{sop}", modality, 0.0), "M",
                      keys=keys(rng, "2.25.1", series, f"2.25.7.{sop}", modality))
            assert_summarised(index)
        assert summarised(index._conn)[0][3] == "SR\\CT\\MR"
        for sop in ("3", "5", "4", "2"):
            stored = index.get(f"2.25.7.{sop}")
            assert stored is not None and index.remove(stored)
            assert_summarised(index)
        assert summarised(index._conn)[0][3] == "MR"
    finally:
        index.close()


def test_a_record_cannot_be_replaced_behind_the_summary_s_back(tmp_path: Path) -> None:
    """SQLite's REPLACE fires no delete trigger: the store deletes first, and a raw REPLACE of an
    existing record is refused rather than leave the summary wrong."""
    index = Index(tmp_path / "index.sqlite", "NORMAL")
    try:
        index.put(record("2.25.1", "2.25.1.1", "2.25.1.1.1", "CT", 0.0), "M")
        with pytest.raises(sqlite3.IntegrityError, match="delete a record before writing it again"):
            index._conn.execute("INSERT OR REPLACE INTO instance_keys (sop_instance_uid, kind, path, "
                                "transfer_syntax_uid, received_at, study_instance_uid) VALUES "
                                "('2.25.1.1.1', 'input', 'x', '1.2', 0, '2.25.2')")
        assert_summarised(index)
    finally:
        index.close()


def test_a_schema_4_store_migrates_to_a_summary_of_its_records(tmp_path: Path) -> None:
    """Schema 5 builds the summary of the records a schema-4 store holds, in the migration's
    transaction; the triggers then keep it."""
    path = tmp_path / "index.sqlite"
    conn = connect(path)
    migrate(conn, "store", index_module._MIGRATIONS[:4])
    assert conn.execute("SELECT 1 FROM sqlite_schema WHERE name = 'study_summary'").fetchone() is None
    rng = random.Random(4)
    with transaction(conn):
        for n in range(300):
            study = rng.choice(STUDIES)
            series, sop = f"{study}.{rng.randint(1, 4)}", f"2.25.8{n}"
            put_keys(conn, rng.choice(list(Kind)), f"instances/{sop}.dcm", "1.2.840.10008.1.2.1", float(n),
                     keys(rng, study, series, sop, rng.choice(MODALITIES)))
    reference = grouped(conn)
    conn.close()
    index = Index(path, "NORMAL")
    try:
        assert schema_version(index._conn, "store") == len(index_module._MIGRATIONS) == 6
        assert summarised(index._conn) == reference and len(reference) == len(STUDIES)
        assert wrong_holders(index._conn) == []
        rng = random.Random(5)
        for n in range(100):
            step(index, rng, 1000.0 + n)
        assert_summarised(index)
    finally:
        index.close()


def test_a_store_with_the_first_layout_of_the_summary_gets_the_current_one(tmp_path: Path) -> None:
    """Schema 5 first built a summary with one holder count for all attributes at once (its
    triggers under the same names): schema 6 drops it and builds the current one."""
    path = tmp_path / "index.sqlite"
    conn = connect(path)
    migrate(conn, "store", index_module._MIGRATIONS[:5])
    rng = random.Random(6)
    with transaction(conn):
        conn.execute("CREATE TABLE study_summary (study_instance_uid TEXT PRIMARY KEY, holders INTEGER)")
        conn.execute("CREATE TABLE study_summary_series (study_instance_uid TEXT, first_record INTEGER)")
        conn.execute("CREATE TRIGGER study_summary_insert AFTER INSERT ON instance_keys BEGIN "
                     "INSERT OR IGNORE INTO study_summary VALUES (new.study_instance_uid, -1); END")
        for n in range(40):
            study = rng.choice(STUDIES)
            sop = f"2.25.8{n}"
            put_keys(conn, Kind.INPUT, f"instances/{sop}.dcm", "1.2.840.10008.1.2.1", float(n),
                     keys(rng, study, f"{study}.{rng.randint(1, 4)}", sop, rng.choice(MODALITIES)))
    conn.close()
    index = Index(path, "NORMAL")
    try:
        assert schema_version(index._conn, "store") == 6
        columns = {row[1] for row in index._conn.execute("PRAGMA table_info(study_summary)")}
        assert "holders" not in columns and "n_study_description" in columns
        assert_summarised(index)
        for n in range(100):
            step(index, rng, 1000.0 + n)
        assert_summarised(index)
    finally:
        index.close()

"""Store schema 3 (query keys): a data folder written at schema 2 (today's release) migrates in
place on start-up; inputs get their keys from their files' headers, NULL keys where the file is
gone, and the results already under ``results/`` are indexed too. Results written from now on
are indexed as they are written, and the keys follow an input that goes.

The schema-2 folders are built two ways: with schema 2's own migrations and its ``Index.put``
writes replayed in SQL (:func:`schema2_put`), and with today's store (whose C-STORE path writes
the schema-2 tables unchanged) with schema 3's table then taken away."""

import logging
import sqlite3
import time
from pathlib import Path

import pytest
from pydicom import Dataset

from dicom_node.phantoms import render, to_dataset
from dicom_node.store import InstanceStore
from dicom_node.store import index as index_module
from dicom_node.store.db import DATABASE_NAME, connect, migrate, schema_version
from dicom_node.store.keyindex import COLUMNS
from tests.factories import new_uid


def radiograph(seed: int, study: str, patient: str) -> Dataset:
    ds = to_dataset(render(seed, 32), study_uid=study, series_uid=new_uid())
    ds.PatientName, ds.PatientID, ds.AccessionNumber = f"{patient}^TEST", f"ID-{patient}", f"ACC{seed}"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = f"2024010{seed}", str(seed), "1"
    return ds


def schema2_put(conn: sqlite3.Connection, data_dir: Path, ds: Dataset, at: float) -> None:
    """What schema 2's ``Index.put`` wrote for an instance stored by C-STORE, its file in place."""
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    relative = Path(study, series, f"{sop}.dcm")
    (data_dir / "instances" / relative).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(data_dir / "instances" / relative, enforce_file_format=True)
    conn.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                 (sop, str(ds.SOPClassUID), series, study, str(ds.file_meta.TransferSyntaxUID), ds.Modality,
                  "CHEST", "", "MODALITY", 1000, str(relative), at))
    (seq,) = conn.execute("SELECT coalesce(max(change_seq), 0) + 1 FROM series").fetchone()
    conn.execute("INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (series, study, ds.Modality, "CHEST", "", "Maker", "MODALITY", at, at, seq))
    conn.execute("INSERT OR IGNORE INTO studies VALUES (?, ?, ?)", (study, at, at))


def keys_of(data_dir: Path) -> dict[str, dict[str, object]]:
    conn = sqlite3.connect(data_dir / DATABASE_NAME)
    rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM instance_keys").fetchall()
    conn.close()
    return {str(row[COLUMNS.index("sop_instance_uid")]): dict(zip(COLUMNS, row, strict=True)) for row in rows}


def test_a_schema_2_folder_migrates_and_its_inputs_and_results_get_their_keys(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    conn = connect(data_dir / DATABASE_NAME)
    migrate(conn, "store", index_module._MIGRATIONS[:2])
    kept, gone = radiograph(1, new_uid(), "ALPHA"), radiograph(2, new_uid(), "BETA")
    at = time.time() - 60
    schema2_put(conn, data_dir, kept, at)
    schema2_put(conn, data_dir, gone, at + 1)
    conn.close()
    (data_dir / "instances" / str(gone.StudyInstanceUID) / str(gone.SeriesInstanceUID)
     / f"{gone.SOPInstanceUID}.dcm").unlink()
    result = radiograph(3, str(kept.StudyInstanceUID), "ALPHA")  # a result file written by schema 2
    result.SOPClassUID = result.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    result.Modality, result.VerificationFlag, result.CompletionFlag = "SR", "UNVERIFIED", "COMPLETE"
    result.ConceptNameCodeSequence = [Dataset()]
    result.ConceptNameCodeSequence[0].update({"CodeValue": "126000", "CodingSchemeDesignator": "DCM",
                                              "CodeMeaning": "Imaging Measurement Report"})
    results = data_dir / "results" / str(result.StudyInstanceUID) / str(result.SeriesInstanceUID)
    results.mkdir(parents=True)
    result.save_as(results / f"{result.SOPInstanceUID}.dcm", enforce_file_format=True)

    store = InstanceStore(data_dir)
    try:
        assert schema_version(store.index._conn, "store") == len(index_module._MIGRATIONS) == 6
        assert store.index.counts() == (2, 2, 2)  # nothing lost
    finally:
        store.close()
    keys = keys_of(data_dir)
    assert set(keys) == {kept.SOPInstanceUID, gone.SOPInstanceUID, result.SOPInstanceUID}
    row = keys[kept.SOPInstanceUID]
    assert (row["kind"], row["patient_id"], row["patient_name"], row["accession_number"], row["study_date"],
            row["series_number"], row["instance_number"]) == ("input", "ID-ALPHA", "ALPHA^TEST", "ACC1",
                                                              "20240101", 1, 1)
    missing = keys[gone.SOPInstanceUID]
    assert missing["patient_id"] is None and missing["accession_number"] is None  # file gone: NULL
    assert missing["study_instance_uid"] == gone.StudyInstanceUID and missing["modality"] == gone.Modality
    sr = keys[result.SOPInstanceUID]
    assert (sr["kind"], sr["concept_code_value"], sr["concept_coding_scheme"], sr["verification_flag"],
            sr["completion_flag"]) == ("result", "126000", "DCM", "UNVERIFIED", "COMPLETE")
    assert sr["path"] == f"results/{result.StudyInstanceUID}/{result.SeriesInstanceUID}/{result.SOPInstanceUID}.dcm"
    # opened again: nothing migrates twice
    InstanceStore(data_dir).close()
    assert keys_of(data_dir) == keys


def test_results_are_indexed_as_written_and_input_keys_go_with_their_record(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "var")
    try:
        ds = radiograph(4, new_uid(), "GAMMA")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        path = store.save_result(ds)
        assert path.is_file()
        [row] = keys_of(tmp_path / "var").values()
        assert (row["kind"], row["patient_id"], row["path"]) == (
            "result", "ID-GAMMA", str(path.relative_to(tmp_path / "var")))
        # an input record deleted by any means takes its keys along (the trigger); results stay
        conn = store.index._conn
        conn.execute("INSERT INTO instances VALUES ('2.25.7', '1.2', '2.25.8', '2.25.9', '1.2.840.10008.1.2.1', "
                      "'CR', '', '', 'X', 1, 'a/b.dcm', 0, 1)")
        conn.execute("INSERT INTO instance_keys (sop_instance_uid, kind, path, transfer_syntax_uid, received_at, "
                     "study_instance_uid, series_instance_uid, sop_class_uid) VALUES "
                     "('2.25.7', 'input', 'instances/a/b.dcm', '1.2.840.10008.1.2.1', 0, '2.25.9', '2.25.8', '1.2')")
        conn.execute("DELETE FROM instances WHERE sop_instance_uid = '2.25.7'")
        assert set(keys_of(tmp_path / "var")) == {ds.SOPInstanceUID}
        assert store.index.result_paths() == [row["path"]]
        assert store.index.remove_result(ds.SOPInstanceUID) and not store.index.remove_result(ds.SOPInstanceUID)
        assert store.index.result_paths() == []
    finally:
        store.close()


def test_a_result_written_but_not_indexed_before_a_crash_is_indexed_at_the_next_start(tmp_path: Path) -> None:
    from dicom_node.store.results import ResultArea

    data_dir = tmp_path / "var"
    InstanceStore(data_dir).close()  # not a clean stop: the next start scans
    ds = radiograph(5, new_uid(), "DELTA")
    ResultArea(data_dir / "results").save(ds)  # the crash came before the index commit
    store = InstanceStore(data_dir)
    try:
        store.recover()
        assert keys_of(data_dir)[ds.SOPInstanceUID]["kind"] == "result"
    finally:
        store.close()


def test_keys_migrated_from_schema_2_equal_the_keys_written_live(tmp_path: Path) -> None:
    """The store's own C-STORE path (stage, commit) writes the schema-2 tables exactly as before;
    take schema 3's table away again and the migration rebuilds, from the files, the very keys
    that commit wrote (received_at aside: the migration keeps the record's)."""
    from tests.store.test_store import put

    data_dir = tmp_path / "var"
    store = InstanceStore(data_dir)
    try:
        for seed in range(3):
            put(store, radiograph(seed + 1, new_uid(), f"P{seed}"), calling="MODALITY")
        store.save_result(radiograph(7, new_uid(), "R"))
    finally:
        store.close()
    live = keys_of(data_dir)
    conn = sqlite3.connect(data_dir / DATABASE_NAME)
    conn.executescript("DROP TRIGGER instance_keys_follow_instances; DROP TABLE instance_keys; "
                       "UPDATE schema_versions SET version = 2 WHERE component = 'store';")
    conn.close()
    InstanceStore(data_dir).close()
    migrated = keys_of(data_dir)
    assert set(migrated) == set(live) and len(live) == 4
    for uid, row in live.items():
        assert {k: v for k, v in migrated[uid].items() if k != "received_at"} == {
            k: v for k, v in row.items() if k != "received_at"}, uid


def test_a_multi_valued_key_is_held_as_dicom_writes_it_and_old_records_are_read_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Versions before schema 4 held "[Doe^John, Roe^Jane]" (a Python list's text): new records
    hold "Doe^John\\Roe^Jane", and opening an older store reads those files again; one whose
    file is gone keeps its old text, and the log counts it."""
    from tests.store.test_store import put

    data_dir = tmp_path / "var"
    ds, lost = radiograph(1, new_uid(), "MULTI"), radiograph(2, new_uid(), "LOST")
    ds.ReferringPhysicianName = lost.ReferringPhysicianName = ["Doe^John", "Roe^Jane"]
    store = InstanceStore(data_dir)
    try:
        put(store, ds)
        put(store, lost)
        record = store.index.get(lost.SOPInstanceUID)
        assert record is not None
        (data_dir / "instances" / record.path).unlink()
    finally:
        store.close()
    assert keys_of(data_dir)[ds.SOPInstanceUID]["referring_physician_name"] == "Doe^John\\Roe^Jane"
    conn = sqlite3.connect(data_dir / DATABASE_NAME)
    conn.executescript("UPDATE instance_keys SET referring_physician_name = '[Doe^John, Roe^Jane]'; "
                       "UPDATE schema_versions SET version = 3 WHERE component = 'store';")
    conn.close()
    with caplog.at_level(logging.INFO, logger="dicom_node.store"):
        InstanceStore(data_dir).close()
    assert keys_of(data_dir)[ds.SOPInstanceUID]["referring_physician_name"] == "Doe^John\\Roe^Jane"
    assert keys_of(data_dir)[lost.SOPInstanceUID]["referring_physician_name"] == "[Doe^John, Roe^Jane]"
    logged = [r.getMessage() for r in caplog.records]
    assert "store schema 4: 2 record(s) with a multi-valued key to read again" in logged
    assert "store: the query keys of 1 file(s) are indexed" in logged
    assert any(m.startswith("store: 1 file(s) could not be read") for m in logged)
    assert not any("schema 3" in m for m in logged)

"""Schema 3 from a data folder the previous release wrote: ``fixtures/schema2``
was written by the code of commit 66a5e66 (the release before schema 3) through its own C-STORE
path (stage, commit) and its own ResultArea; see ``fixtures/README.md``. A copy migrates in
place; the files' headers are read in committed batches after a short migration transaction, so
a start killed halfway resumes, and the progress is logged."""

import logging
import shutil
import sqlite3
from pathlib import Path

import pytest

from dicom_node.query.match import find
from dicom_node.store import InstanceStore
from dicom_node.store.db import DATABASE_NAME, schema_version
from dicom_node.store.keyindex import Backfill
from tests.store.test_keys_migration import keys_of

FIXTURE = Path(__file__).parent / "fixtures" / "schema2"
INPUTS = {"2.25.300001.1.1", "2.25.300001.1.2", "2.25.300002.1.1", "2.25.300002.1.2"}
RESULT = "2.25.300001.9.1"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    copy = tmp_path / "var"
    shutil.copytree(FIXTURE, copy)
    conn = sqlite3.connect(copy / DATABASE_NAME)
    assert schema_version(conn, "store") == 2  # as the previous release left it
    conn.close()
    return copy


def backfill_left(data_dir: Path) -> int | None:
    conn = sqlite3.connect(data_dir / DATABASE_NAME)
    try:
        return int(conn.execute("SELECT count(*) FROM keys_backfill").fetchone()[0])
    except sqlite3.OperationalError:
        return None  # no list: nothing left
    finally:
        conn.close()


def test_the_previous_release_s_folder_migrates_and_answers_queries(data_dir: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    store = InstanceStore(data_dir)
    try:
        store.recover()
        assert schema_version(store.index._conn, "store") == 6
        assert store.index.counts() == (2, 2, 4)
        query = find({"QueryRetrieveLevel": "STUDY", "PatientName": "alpha^fixture", "StudyInstanceUID": "",
                      "AccessionNumber": "", "NumberOfStudyRelatedInstances": "", "ModalitiesInStudy": ""})
        [row] = store.index.find(query.sql, query.params)
        answer = query.dataset(row)
        assert (answer.StudyInstanceUID, answer.AccessionNumber, answer.NumberOfStudyRelatedInstances) == (
            "2.25.300001", "ACC-A", 3)
        assert sorted(answer.ModalitiesInStudy) == ["CR", "SR"]
    finally:
        store.close()
    keys = keys_of(data_dir)
    assert set(keys) == INPUTS | {RESULT}
    assert keys["2.25.300002.1.2"]["patient_id"] == "ID-BETA" and keys["2.25.300002.1.2"]["instance_number"] == 2
    assert (keys[RESULT]["kind"], keys[RESULT]["concept_code_value"]) == ("result", "126000")
    assert backfill_left(data_dir) is None
    assert "5 stored file(s) to read the query keys of" in caplog.text
    assert "the query keys of 5 file(s) are indexed" in caplog.text


def test_a_start_killed_while_reading_headers_resumes_where_it_stopped(data_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Backfill, "BATCH", 2)
    read = Backfill.read
    calls: list[int] = []

    def killed_at_the_second_batch(self: Backfill, pending: list[tuple[str, object]]) -> object:
        calls.append(len(pending))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill: nothing after this runs
        return read(self, pending)  # type: ignore[arg-type]

    monkeypatch.setattr(Backfill, "read", killed_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        InstanceStore(data_dir)
    conn = sqlite3.connect(data_dir / DATABASE_NAME)
    assert schema_version(conn, "store") == 6  # the migrations themselves committed first
    conn.close()
    assert backfill_left(data_dir) == 3  # the first batch of 2 is kept
    read_first = {sop for sop, row in keys_of(data_dir).items() if row["patient_id"]}
    assert len(read_first) == 2
    monkeypatch.setattr(Backfill, "read", read)
    calls.clear()
    InstanceStore(data_dir).close()
    assert backfill_left(data_dir) is None
    keys = keys_of(data_dir)
    assert set(keys) == INPUTS | {RESULT} and all(keys[sop]["patient_id"] for sop in INPUTS)

"""A data folder made by the previous schema (store 1, jobs 1: series keyed by Series Instance UID
alone) opens, is migrated in place, and its data is still listed and processable; the series the
old key had folded together are taken apart and processed each with its own study's instances."""

import dataclasses
import hashlib
import json
import logging
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom import Dataset

from dicom_node.audit import read_events
from dicom_node.config import Pipeline, Settings
from dicom_node.export import outbox as outbox_module
from dicom_node.export.outbox import Outbox
from dicom_node.inference import InferenceRunner, ModelRegistry
from dicom_node.jobs import sqlite as jobs_module
from dicom_node.jobs.queue import JobQueue, JobSpec, JobState
from dicom_node.jobs.scheduler import Scheduler
from dicom_node.jobs.sqlite import SQLiteJobBackend
from dicom_node.phantoms import render, to_dataset
from dicom_node.pipeline import default_steps, run
from dicom_node.store import InstanceStore, SeriesKey
from dicom_node.store import index as index_module
from dicom_node.store.db import DATABASE_NAME, connect, migrate
from dicom_node.web import data as web_data
from tests.factories import new_uid
from tests.inference.models import write_model

PIPELINE = Pipeline(name="chest", model="tiny", match={"modality": ("CR",)}, explain=("gradcam",),
                    explain_labels="top-1", outputs=("sc", "sr"))


#: What the old mixed job sent: BETA's finding and images filed in ALPHA's study.
MIXED_OUTPUTS = ("2.25.101", "2.25.102", "2.25.103")


def radiograph(seed: int, study: str, series: str, patient: str) -> Dataset:
    ds = to_dataset(render(seed, 64), study_uid=study, series_uid=series)
    ds.PatientName, ds.PatientID = f"{patient}^TEST", f"ID-{patient}"
    return ds


def old_put(conn: sqlite3.Connection, data_dir: Path, ds: Dataset, at: float) -> None:
    """What the previous version's store did: the file in place, then its index records, the
    series record keyed by Series Instance UID alone (and left behind when an instance moved)."""
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    relative = Path(study, series, f"{sop}.dcm")
    (data_dir / "instances" / relative).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(data_dir / "instances" / relative, enforce_file_format=True)
    old = conn.execute("SELECT path FROM instances WHERE sop_instance_uid = ?", (sop,)).fetchone()
    if old is not None:
        (data_dir / "instances" / old[0]).unlink()
    conn.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                 (sop, str(ds.SOPClassUID), series, study, "1.2.840.10008.1.2.1", ds.Modality, "CHEST", "",
                  "MODALITY", 1000, str(relative), at))
    (seq,) = conn.execute("SELECT coalesce(max(change_seq), 0) + 1 FROM series").fetchone()
    conn.execute("INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                 "last_received_at = max(last_received_at, excluded.last_received_at), "
                 "change_seq = excluded.change_seq",
                 (series, study, ds.Modality, "CHEST", "", "Maker", "MODALITY", at, at, seq))
    conn.execute("INSERT INTO studies VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET "
                 "last_received_at = max(last_received_at, excluded.last_received_at)", (study, at, at))


def old_job(conn: sqlite3.Connection, study: str, series: str, uids: list[str], at: float,
            outputs: tuple[str, ...] = ()) -> int:
    """A done job as the previous version recorded it (its key without the study)."""
    key = hashlib.sha256("\n".join([series, *sorted(uids), "chest", "tiny", "0.1"]).encode()).hexdigest()
    results = {"outputs": [{"sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34", "sop_instance_uid": uid,
                            "series_instance_uid": "2.25.9", "series_description": "AI"} for uid in outputs]}
    cursor = conn.execute(
        "INSERT INTO jobs VALUES (NULL, ?, ?, ?, ?, 'chest', 'tiny', '0.1', 1, 'done', '', 1, 0, '', 0, "
        "?, ?, ?, '{}', ?)", (key, study, series, json.dumps(uids), at, at, at, json.dumps(results)))
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def make_old_folder(data_dir: Path) -> dict[str, Dataset]:
    """Two patients' studies sharing a series (processed as one mixed job, the old bug), a third
    study processed and delivered, and a study whose only instance moved away (left listed)."""
    data_dir.mkdir(parents=True)
    conn = connect(data_dir / DATABASE_NAME)
    migrate(conn, "store", index_module._MIGRATIONS[:1])
    migrate(conn, "jobs", jobs_module._MIGRATIONS[:1])
    migrate(conn, "outbox", outbox_module._MIGRATIONS[:1])
    shared = new_uid()
    sent = {"alpha": radiograph(1, new_uid(), shared, "ALPHA"), "beta": radiograph(2, new_uid(), shared, "BETA"),
            "gamma": radiograph(3, new_uid(), new_uid(), "GAMMA")}
    moved = radiograph(4, new_uid(), new_uid(), "DELTA")
    moved.SOPInstanceUID = moved.file_meta.MediaStorageSOPInstanceUID = sent["gamma"].SOPInstanceUID
    at = time.time() - 3600
    for n, ds in enumerate([moved, sent["alpha"], sent["beta"], sent["gamma"]]):
        old_put(conn, data_dir, ds, at + n)
    old_job(conn, str(sent["alpha"].StudyInstanceUID), shared,
            [str(sent["alpha"].SOPInstanceUID), str(sent["beta"].SOPInstanceUID)], at + 10, MIXED_OUTPUTS)
    gamma = sent["gamma"]
    job = old_job(conn, str(gamma.StudyInstanceUID), str(gamma.SeriesInstanceUID), [str(gamma.SOPInstanceUID)],
                  at + 11)
    conn.execute("INSERT INTO outbox VALUES (NULL, '2.25.1', 'pacs', '1.2.840.10008.5.1.4.1.1.88.34', ?, "
                 "'results/x.dcm', ?, 'delivered', 1, 0, '', ?, ?, ?)",
                 (str(gamma.StudyInstanceUID), job, at + 12, at + 12, at + 12))
    (watermark,) = conn.execute("SELECT max(change_seq) FROM series").fetchone()
    conn.execute("INSERT INTO scheduler_state VALUES ('watermark', ?)", (watermark,))  # all scheduled
    conn.close()
    return {**sent, "moved": moved}


def test_an_old_data_folder_is_migrated_in_place_listed_and_processable(tmp_path: Path, settings: Settings) -> None:
    data_dir = settings.node.data_dir
    sent = make_old_folder(data_dir)
    alpha, beta, gamma = sent["alpha"], sent["beta"], sent["gamma"]
    shared = str(alpha.SeriesInstanceUID)
    store = InstanceStore(data_dir)
    backend = SQLiteJobBackend(data_dir / DATABASE_NAME)
    outbox = Outbox(data_dir / DATABASE_NAME)
    try:
        versions = dict(backend.conn.execute("SELECT component, version FROM schema_versions").fetchall())
        assert versions == {"store": len(index_module._MIGRATIONS), "jobs": len(jobs_module._MIGRATIONS),
                            "outbox": len(outbox_module._MIGRATIONS)}
        # listed: one series per (study, series); the emptied study of the moved instance is gone
        keys = {SeriesKey(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)) for ds in (alpha, beta, gamma)}
        assert {s.key for s in store.index.series()} == keys
        assert store.index.counts() == (3, 3, 3)
        listed = web_data.studies(SimpleNamespace(data_dir=data_dir))  # type: ignore[arg-type]
        assert sorted(row["study_instance_uid"] for row in listed) == sorted(k.study_instance_uid for k in keys)
        assert all(row["series"] == 1 and row["instances"] == 1 for row in listed)
        for ds in (alpha, beta):
            [record] = store.index.instances(SeriesKey(str(ds.StudyInstanceUID), shared))
            assert record.sop_instance_uid == ds.SOPInstanceUID
        # old keys now include the study: what was processed is not processed again
        gamma_job = next(j for j in backend.select(list(JobState)) if j.study_instance_uid == gamma.StudyInstanceUID)
        assert gamma_job.key == JobSpec(gamma.StudyInstanceUID, gamma.SeriesInstanceUID, (gamma.SOPInstanceUID,),
                                        "chest", "tiny", "0.1").key
        assert [r.state for r in outbox.list()] == ["delivered"]
        # the series' loop-guard Manufacturer comes from its own study's old record only
        manufacturers = {s.study_instance_uid: s.manufacturer for s in store.index.series()}
        assert (manufacturers[alpha.StudyInstanceUID], manufacturers[beta.StudyInstanceUID]) == ("Maker", "")
        # processable: the series the old key mixed are scheduled again, each with its own instances
        queue = JobQueue(backend)
        scheduler = Scheduler(store, queue, (PIPELINE,), 0.0, lambda name: "0.1", clock=time.time)
        jobs = {job.study_instance_uid: job for job in scheduler.tick()}
        assert sorted(jobs) == sorted([str(alpha.StudyInstanceUID), str(beta.StudyInstanceUID)])
        assert scheduler.tick() == []
        write_model(tmp_path / "models", "tiny")
        runner = InferenceRunner(ModelRegistry(tmp_path / "models"), device="cpu")
        configured = dataclasses.replace(settings, pipelines=(PIPELINE,))
        for ds, version in ((alpha, 2), (beta, 1)):
            job = jobs[str(ds.StudyInstanceUID)]
            assert (job.instance_uids, job.version) == ((ds.SOPInstanceUID,), version)
            ctx = run(job, {}, settings=configured, store=store, steps=default_steps(), runner=runner)
            assert ctx.outputs and all(out.PatientID == ds.PatientID for out in ctx.outputs)
            assert {p.sop_instance_uid for p in ctx.predictions} == {ds.SOPInstanceUID}
    finally:
        outbox.close()
        backend.close()
        store.close()


def test_the_upgrade_flags_a_job_that_delivered_mixed_results_once(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = settings.node.data_dir
    sent = make_old_folder(data_dir)
    alpha, beta, gamma = sent["alpha"], sent["beta"], sent["gamma"]
    store = InstanceStore(data_dir)
    with caplog.at_level(logging.ERROR, logger="dicom_node.jobs.sqlite"):
        backend = SQLiteJobBackend(data_dir / DATABASE_NAME)
    try:
        by_study = {job.study_instance_uid: job for job in backend.select(list(JobState))}
        mixed = by_study[str(alpha.StudyInstanceUID)]
        assert mixed.state == JobState.DONE
        assert mixed.reason.startswith("results mixed 2 studies before the upgrade: remove outputs ")
        assert all(uid in mixed.reason for uid in MIXED_OUTPUTS) and "from the PACS" in mixed.reason
        assert by_study[str(gamma.StudyInstanceUID)].reason == ""  # one study: nothing to flag
        studies = sorted([str(alpha.StudyInstanceUID), str(beta.StudyInstanceUID)])
        [event] = [e for e in read_events(data_dir / "audit") if e["event"] == "mixed_results_delivered"]
        assert event == {**event, "job": mixed.id, "study_instance_uid": alpha.StudyInstanceUID,
                         "series_instance_uid": alpha.SeriesInstanceUID, "study_instance_uids": studies,
                         "outputs": list(MIXED_OUTPUTS)}
        [logged] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert f"job {mixed.id} " in logged.getMessage() and MIXED_OUTPUTS[0] in logged.getMessage()
        text = json.dumps(event) + logged.getMessage() + mixed.reason
        assert not any(value in text for value in ("ALPHA", "BETA"))  # UIDs only, no patient values
        assert store.index.studies_of([*mixed.instance_uids, "1.2.3"]) == studies
    finally:
        backend.close()
    # once: opening again migrates nothing and records nothing more
    SQLiteJobBackend(data_dir / DATABASE_NAME).close()
    store.close()
    assert sum(e["event"] == "mixed_results_delivered" for e in read_events(data_dir / "audit")) == 1


def test_a_study_without_an_old_record_of_its_own_gets_no_manufacturer(settings: Settings) -> None:
    """The loop guard reads Manufacturer: a study must not inherit another study's (here the
    node's own, which would stop its series from ever being routed)."""
    data_dir = settings.node.data_dir
    data_dir.mkdir(parents=True)
    conn = connect(data_dir / DATABASE_NAME)
    migrate(conn, "store", index_module._MIGRATIONS[:1])
    shared, at = new_uid(), time.time()
    first, second = radiograph(1, new_uid(), shared, "ALPHA"), radiograph(2, new_uid(), shared, "BETA")
    old_put(conn, data_dir, first, at)
    old_put(conn, data_dir, second, at + 1)
    conn.execute("UPDATE series SET manufacturer = 'dicom-node'")
    migrate(conn, "store", index_module._MIGRATIONS)
    rows = dict(conn.execute("SELECT study_instance_uid, manufacturer FROM series").fetchall())
    conn.close()
    assert rows == {first.StudyInstanceUID: "dicom-node", second.StudyInstanceUID: ""}

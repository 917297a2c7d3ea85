"""A data folder made by the previous schema (store 1, jobs 1: series keyed by Series Instance UID
alone) opens, is migrated in place, and its data is still listed and processable; the series the
old key had folded together are taken apart and processed each with its own study's instances."""

import dataclasses
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

from pydicom import Dataset

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


def old_job(conn: sqlite3.Connection, study: str, series: str, uids: list[str], at: float) -> int:
    """A done job as the previous version recorded it (its key without the study)."""
    key = hashlib.sha256("\n".join([series, *sorted(uids), "chest", "tiny", "0.1"]).encode()).hexdigest()
    cursor = conn.execute(
        "INSERT INTO jobs VALUES (NULL, ?, ?, ?, ?, 'chest', 'tiny', '0.1', 1, 'done', '', 1, 0, '', 0, "
        "?, ?, ?, '{}', '{}')", (key, study, series, json.dumps(uids), at, at, at))
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
            [str(sent["alpha"].SOPInstanceUID), str(sent["beta"].SOPInstanceUID)], at + 10)
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
        assert versions == {"store": 2, "jobs": 2, "outbox": len(outbox_module._MIGRATIONS)}
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

"""No cross-patient mix-up: two studies of two patients that share a Series Instance UID are two
series, two jobs, and each job's results carry only its own patient, study and images. An
instance stored again under another study is never read by the older study's job."""

import dataclasses
import time
from pathlib import Path

import pytest
from pydicom import Dataset

from dicom_node.config import Pipeline, Settings
from dicom_node.inference import InferenceRunner, ModelRegistry
from dicom_node.jobs.memory import MemoryJobBackend
from dicom_node.jobs.queue import Job, JobQueue
from dicom_node.jobs.scheduler import Scheduler
from dicom_node.phantoms import render, to_dataset
from dicom_node.pipeline import StaleJobError, default_steps, run
from dicom_node.store import InstanceStore, SeriesKey
from tests.factories import new_uid
from tests.inference.models import write_model
from tests.store.test_store import put

PIPELINE = Pipeline(name="chest", model="tiny", match={"modality": ("CR",)}, explain=("gradcam",),
                    explain_labels="top-1", outputs=("sc", "sr"))


def radiograph(seed: int, study: str, series: str, patient: str) -> Dataset:
    ds = to_dataset(render(seed, 96), study_uid=study, series_uid=series, instance_number=seed % 10 + 1)
    ds.PatientName, ds.PatientID = f"{patient}^TEST", f"ID-{patient}"
    return ds


def referenced(ds: Dataset) -> set[str]:
    """Every Referenced SOP Instance UID anywhere in ``ds`` (nested sequences included)."""
    return {str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}


def tick(store: InstanceStore, queue: JobQueue) -> list[Job]:
    scheduler = Scheduler(store, queue, (PIPELINE,), 0.0, lambda name: "0.1", clock=time.time)
    return scheduler.tick()


@pytest.fixture
def runner(tmp_path: Path) -> InferenceRunner:
    write_model(tmp_path / "models", "tiny")
    return InferenceRunner(ModelRegistry(tmp_path / "models"), device="cpu")


def test_two_patients_sharing_a_series_uid_get_two_jobs_with_their_own_results(
    store: InstanceStore, settings: Settings, runner: InferenceRunner
) -> None:
    shared = new_uid()
    studies = {"ALPHA": new_uid(), "BETA": new_uid()}
    sent = {name: [radiograph(seed, uid, shared, name) for seed in (seed0, seed0 + 1)]
            for (name, uid), seed0 in zip(studies.items(), (11, 21), strict=True)}
    for a, b in zip(sent["ALPHA"], sent["BETA"], strict=True):  # interleaved
        put(store, a)
        put(store, b)
    queue = JobQueue(MemoryJobBackend())
    jobs = {job.study_instance_uid: job for job in tick(store, queue)}
    assert sorted(jobs) == sorted(studies.values())
    configured = dataclasses.replace(settings, pipelines=(PIPELINE,))
    made: dict[str, set[str]] = {}
    for name, study in studies.items():
        job = jobs[study]
        own = {str(ds.SOPInstanceUID) for ds in sent[name]}
        assert (job.series_instance_uid, set(job.instance_uids), job.version) == (shared, own, 1)
        ctx = run(job, {}, settings=configured, store=store, steps=default_steps(), runner=runner)
        assert {p.sop_instance_uid for p in ctx.predictions} == own
        outputs = {str(ds.SOPInstanceUID) for ds in ctx.outputs}
        assert sorted(ds.Modality for ds in ctx.outputs) == ["OT"] * 2 + ["SR"]  # top label x 2 images
        for ds in ctx.outputs:
            assert (ds.StudyInstanceUID, ds.PatientID, str(ds.PatientName)) == (study, f"ID-{name}",
                                                                                 f"{name}^TEST")
            assert referenced(ds) and referenced(ds) <= own | outputs, ds.Modality
        [report] = [ds for ds in ctx.outputs if ds.Modality == "SR"]
        assert own <= referenced(report)  # the report covers its own images
        made[study] = outputs | {str(ds.SeriesInstanceUID) for ds in ctx.outputs}
    alpha, beta = made.values()
    assert not alpha & beta  # no output Series or SOP Instance UID in common


def test_an_instance_stored_again_under_another_study_is_not_read_by_the_older_job(
    store: InstanceStore, settings: Settings, runner: InferenceRunner
) -> None:
    study, series = new_uid(), new_uid()
    kept, moving = (radiograph(seed, study, series, "ALPHA") for seed in (31, 32))
    put(store, kept)
    put(store, moving)
    queue = JobQueue(MemoryJobBackend())
    [old_job] = tick(store, queue)
    # the same SOP Instance UID arrives in another patient's study: the newer copy wins
    elsewhere = radiograph(33, new_uid(), new_uid(), "BETA")
    elsewhere.SOPInstanceUID = elsewhere.file_meta.MediaStorageSOPInstanceUID = moving.SOPInstanceUID
    put(store, elsewhere)
    configured = dataclasses.replace(settings, pipelines=(PIPELINE,))
    with pytest.raises(StaleJobError, match="now stored in study"):
        run(old_job, {}, settings=configured, store=store, steps=default_steps(), runner=runner)
    assert not (settings.node.data_dir / "results").exists()  # nothing made, not even a report
    # what is left of the old series gets a newer job; the moved instance is its new study's
    newer = {job.study_instance_uid: job for job in tick(store, queue)}
    assert set(newer[study].instance_uids) == {kept.SOPInstanceUID} and newer[study].version == 2
    assert newer[str(elsewhere.StudyInstanceUID)].instance_uids == (moving.SOPInstanceUID,)
    ctx = run(newer[study], {}, settings=configured, store=store, steps=default_steps(), runner=runner)
    assert all(ds.PatientID == "ID-ALPHA" for ds in ctx.outputs)
    assert all(moving.SOPInstanceUID not in referenced(ds) for ds in ctx.outputs)


def test_an_instance_that_moves_between_collect_and_read_fails_the_job_as_stale(
    store: InstanceStore, settings: Settings, runner: InferenceRunner
) -> None:
    from dicom_node.pipeline import collect, read

    study, series = new_uid(), new_uid()
    ds = radiograph(41, study, series, "ALPHA")
    put(store, ds)
    [job] = tick(store, JobQueue(MemoryJobBackend()))
    elsewhere = radiograph(42, new_uid(), series, "BETA")  # same series UID, another study
    elsewhere.SOPInstanceUID = elsewhere.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

    def move(_: object) -> None:
        put(store, elsewhere)

    with pytest.raises(StaleJobError):
        run(job, {}, settings=settings, store=store, runner=runner,
            steps=[("collect", collect), ("move", move), ("read", read)])
    assert store.index.instances(SeriesKey(study, series)) == []

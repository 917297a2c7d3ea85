"""The scheduler over both queue backends: a series is its study and its Series Instance UID, so
two studies sharing a Series Instance UID make two jobs, with their own versions."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.config import Pipeline
from dicom_node.jobs.queue import JobQueue
from dicom_node.jobs.scheduler import Scheduler
from dicom_node.store import InstanceStore, SeriesRecord
from tests.factories import ct_dataset, new_uid
from tests.jobs.conftest import FakeClock
from tests.store.test_store import put

PIPELINES = (Pipeline(name="ct", model="demo", match={"modality": ("CT",)}),)


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[InstanceStore]:
    s = InstanceStore(tmp_path / "data", clock=clock)
    yield s
    s.close()


def test_two_studies_sharing_a_series_uid_make_two_jobs_with_their_own_versions(
    store: InstanceStore, queue: JobQueue, clock: FakeClock
) -> None:
    sched = Scheduler(store, queue, PIPELINES, 10.0, lambda name: "v1", clock=clock)
    shared, alpha, beta = new_uid(), new_uid(), new_uid()
    sent = {study: [ct_dataset(study=study, series=shared) for _ in range(2)] for study in (alpha, beta)}
    for a, b in zip(sent[alpha], sent[beta], strict=True):
        put(store, a)
        put(store, b)
    clock.advance(11)
    jobs = {job.study_instance_uid: job for job in sched.tick()}
    assert sorted(jobs) == sorted([alpha, beta])
    for study, job in jobs.items():
        assert job.series_instance_uid == shared and job.version == 1
        assert set(job.instance_uids) == {ds.SOPInstanceUID for ds in sent[study]}
    assert jobs[alpha].key != jobs[beta].key
    late = put(store, ct_dataset(study=beta, series=shared))  # one more image, for BETA only
    clock.advance(11)
    [again] = sched.tick()
    assert (again.study_instance_uid, again.version) == (beta, 2)
    assert late.sop_instance_uid in again.instance_uids and len(again.instance_uids) == 3


def test_a_series_emptied_after_it_was_listed_makes_no_job(
    store: InstanceStore, queue: JobQueue, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index lists a changed series, then its only instance moves to another study before
    the scheduler reads its instances: no job without instances is queued."""
    sched = Scheduler(store, queue, PIPELINES, 10.0, lambda name: "v1", clock=clock)
    ds = ct_dataset(study=new_uid(), series=new_uid())
    put(store, ds)
    clock.advance(11)
    moved = ct_dataset(study=new_uid(), series=new_uid())
    moved.SOPInstanceUID = moved.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    listed = store.index.series_changed_since

    def list_then_move(change_seq: int) -> list[SeriesRecord]:
        found = listed(change_seq)
        if found:
            put(store, moved)  # lands after the listing: the listed series is now empty
        return found

    monkeypatch.setattr(store.index, "series_changed_since", list_then_move)
    assert sched.tick() == []
    assert queue.list() == []
    monkeypatch.undo()
    clock.advance(11)
    [job] = sched.tick()  # the study the instance moved to is scheduled on its own
    assert (job.study_instance_uid, job.instance_uids) == (moved.StudyInstanceUID, (ds.SOPInstanceUID,))

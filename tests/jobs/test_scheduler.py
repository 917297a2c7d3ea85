"""Series completeness and job creation, driven by a hand-moved clock over a real store."""

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node import MANUFACTURER
from dicom_node.config import Pipeline
from dicom_node.ingest.scp import start_ingest
from dicom_node.jobs.memory import MemoryJobBackend
from dicom_node.jobs.queue import JobQueue, JobState
from dicom_node.jobs.scheduler import Scheduler
from dicom_node.jobs.sqlite import SQLiteJobBackend
from dicom_node.store import InstanceStore
from tests.conftest import make_settings
from tests.factories import ct_dataset, new_uid
from tests.ingest.test_scp import send
from tests.jobs.conftest import POLICY, FakeClock
from tests.store.test_store import put

STABLE = 10.0
PIPELINES = (Pipeline(name="ct", model="demo", match={"modality": ("CT",)}),)


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[InstanceStore]:
    s = InstanceStore(tmp_path / "data", clock=clock)
    yield s
    s.close()


def scheduler(store: InstanceStore, queue: JobQueue, clock: FakeClock,
              pipelines: tuple[Pipeline, ...] = PIPELINES) -> Scheduler:
    return Scheduler(store, queue, pipelines, STABLE, lambda name: "v1", clock=clock)


def test_a_series_is_complete_after_stable_seconds_without_new_instances(
    store: InstanceStore, clock: FakeClock
) -> None:
    queue = JobQueue(MemoryJobBackend(), POLICY, clock=clock)
    sched = scheduler(store, queue, clock)
    first = ct_dataset()
    put(store, first)
    clock.advance(6)
    second = put(store, ct_dataset(study=first.StudyInstanceUID, series=first.SeriesInstanceUID))
    clock.advance(6)  # 12 s after the first, 6 s after the second: not complete yet
    assert sched.tick() == []
    clock.advance(4)
    [job] = sched.tick()
    assert job.series_instance_uid == first.SeriesInstanceUID and job.pipeline == "ct"
    assert set(job.instance_uids) == {first.SOPInstanceUID, second.sop_instance_uid}
    assert (job.model, job.model_version, job.version) == ("demo", "v1", 1)
    clock.advance(60)
    assert sched.tick() == []  # nothing new: nothing queued twice


def test_late_instances_make_a_new_job_version(store: InstanceStore, clock: FakeClock) -> None:
    queue = JobQueue(MemoryJobBackend(), POLICY, clock=clock)
    sched = scheduler(store, queue, clock)
    ds = ct_dataset()
    put(store, ds)
    clock.advance(STABLE + 1)
    [v1] = sched.tick()
    clock.advance(100)  # processed long ago; then the modality sends one more image
    late = ct_dataset(study=ds.StudyInstanceUID, series=ds.SeriesInstanceUID)
    put(store, late)
    clock.advance(STABLE + 1)
    [v2] = sched.tick()
    assert (v1.version, v2.version) == (1, 2)
    assert set(v2.instance_uids) == {ds.SOPInstanceUID, late.SOPInstanceUID}


def test_resending_the_same_instances_queues_nothing_new(store: InstanceStore, clock: FakeClock) -> None:
    queue = JobQueue(MemoryJobBackend(), POLICY, clock=clock)
    sched = scheduler(store, queue, clock)
    ds = ct_dataset()
    put(store, ds)
    clock.advance(STABLE + 1)
    assert len(sched.tick()) == 1
    put(store, ds)  # the PACS sends the study again
    clock.advance(STABLE + 1)
    assert sched.tick() == []
    assert len(queue.list()) == 1


def test_several_series_in_one_study_and_unrouted_series(store: InstanceStore, clock: FakeClock) -> None:
    queue = JobQueue(MemoryJobBackend(), POLICY, clock=clock)
    sched = scheduler(store, queue, clock)
    study = new_uid()
    series = [new_uid() for _ in range(3)]
    for s in series:
        for _ in range(2):
            put(store, ct_dataset(study=study, series=s))
    mr = ct_dataset(study=study)
    mr.Modality = "MR"
    put(store, mr)
    clock.advance(STABLE + 1)
    jobs = sched.tick()
    queued = [j for j in jobs if j.state == JobState.QUEUED]
    assert sorted(j.series_instance_uid for j in queued) == sorted(series)
    assert all(len(j.instance_uids) == 2 for j in queued)
    [unrouted] = queue.list(JobState.NOT_ROUTED)
    assert unrouted.series_instance_uid == mr.SeriesInstanceUID
    assert "modality 'MR' not in ['CT']" in unrouted.reason


def test_own_outputs_coming_back_are_not_routed(store: InstanceStore, clock: FakeClock) -> None:
    queue = JobQueue(MemoryJobBackend(), POLICY, clock=clock)
    sched = scheduler(store, queue, clock, pipelines=(Pipeline(name="all", model="demo"),))
    ours = ct_dataset()
    ours.Manufacturer = MANUFACTURER
    put(store, ours)
    clock.advance(STABLE + 1)
    [record] = sched.tick()
    assert record.state == JobState.NOT_ROUTED and "created by this node" in record.reason


def test_series_completed_while_the_node_was_down_are_found_after_restart(
    store: InstanceStore, clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.sqlite"
    backend = SQLiteJobBackend(path)
    sched = scheduler(store, JobQueue(backend, POLICY, clock=clock), clock)
    early = ct_dataset()
    put(store, early)
    clock.advance(STABLE + 1)
    assert len(sched.tick()) == 1
    pending = ct_dataset()
    put(store, pending)
    clock.advance(1)
    assert sched.tick() == []
    backend.close()  # the node stops here, and is down for an hour

    clock.advance(3600)
    backend = SQLiteJobBackend(path)
    try:
        queue = JobQueue(backend, POLICY, clock=clock)
        [job] = scheduler(store, queue, clock).tick()
        assert job.series_instance_uid == pending.SeriesInstanceUID
        assert len(queue.list()) == 2
    finally:
        backend.close()


def test_two_studies_interleaved_over_concurrent_associations(tmp_path: Path, clock: FakeClock) -> None:
    settings = make_settings(tmp_path / "node")
    store = InstanceStore(settings.node.data_dir, clock=clock)
    server = start_ingest(settings, store)
    try:
        studies = [(new_uid(), new_uid()), (new_uid(), new_uid())]
        batches = [[ct_dataset(study=st, series=se) for _ in range(10)] for st, se in studies]
        pairs = list(zip(*batches, strict=True))
        # Two associations at once, each sending instances of both studies alternately.
        halves = [[ds for pair in pairs[i::2] for ds in pair] for i in (0, 1)]
        results: list[list[tuple[int, str]]] = []
        threads = [threading.Thread(target=lambda h=h: results.append(send(server.port, *h)))
                   for h in halves]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(map(len, results)) == [10, 10] and all(r == (0, "") for rs in results for r in rs)
        queue = JobQueue(MemoryJobBackend(), POLICY, clock=clock)
        sched = scheduler(store, queue, clock)
        clock.advance(STABLE + 1)
        jobs = sched.tick()
        by_series = {j.series_instance_uid: j for j in jobs}
        assert len(jobs) == 2 and set(by_series) == {se for _, se in studies}
        for (study, series), batch in zip(studies, batches, strict=True):
            assert by_series[series].study_instance_uid == study
            assert set(by_series[series].instance_uids) == {ds.SOPInstanceUID for ds in batch}
    finally:
        server.stop(2.0)
        store.close()


def test_a_clock_stepping_back_delays_but_never_loses_a_series(store: InstanceStore, clock: FakeClock) -> None:
    queue = JobQueue(MemoryJobBackend(), POLICY, clock=clock)
    sched = scheduler(store, queue, clock)
    ds = ct_dataset()
    put(store, ds)
    clock.advance(-120)  # NTP steps the clock back two minutes
    for _ in range(12):
        assert sched.tick() == []
        clock.advance(10)
    clock.advance(STABLE + 1)
    [job] = sched.tick()
    assert job.series_instance_uid == ds.SeriesInstanceUID


def test_an_unfinished_series_holds_the_watermark_and_later_ones_still_run(
    store: InstanceStore, clock: FakeClock
) -> None:
    queue = JobQueue(MemoryJobBackend(), POLICY, clock=clock)
    sched = scheduler(store, queue, clock)
    first = ct_dataset()
    put(store, first)  # change 1, stamped T
    clock.advance(-100)  # the clock steps back
    second = ct_dataset()
    put(store, second)  # change 2, stamped T - 100
    clock.advance(STABLE + 1)
    # change 2 is stable, change 1 is not (by the clock): 2 runs, the watermark stays below 1
    assert [j.series_instance_uid for j in sched.tick()] == [second.SeriesInstanceUID]
    clock.advance(100)
    assert [j.series_instance_uid for j in sched.tick()] == [first.SeriesInstanceUID]
    assert sched.tick() == []


def test_a_series_whose_scheduling_fails_is_tried_again(store: InstanceStore, clock: FakeClock) -> None:
    queue = JobQueue(MemoryJobBackend(), POLICY, clock=clock)
    versions = iter([RuntimeError("model repository unreadable"), "v1"])

    def model_version(name: str) -> str:
        value = next(versions)
        if isinstance(value, Exception):
            raise value
        return value

    sched = Scheduler(store, queue, PIPELINES, STABLE, model_version, clock=clock)
    ds = ct_dataset()
    put(store, ds)
    clock.advance(STABLE + 1)
    assert sched.tick() == []
    [job] = sched.tick()
    assert job.series_instance_uid == ds.SeriesInstanceUID

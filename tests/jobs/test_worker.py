"""Workers: run a claimed job to its end, record failures with their timings, keep the lease."""

import threading
import time

import pytest

from dicom_node.errors import PermanentError
from dicom_node.jobs.memory import MemoryJobBackend
from dicom_node.jobs.queue import Job, JobQueue, JobSpec, JobState, QueuePolicy
from dicom_node.jobs.sqlite import SQLiteJobBackend
from dicom_node.jobs.worker import Worker
from tests.jobs.conftest import POLICY, FakeClock


def queue_with_job(policy: QueuePolicy = POLICY, clock=None) -> JobQueue:
    queue = JobQueue(MemoryJobBackend(), policy, **({"clock": clock} if clock else {}))
    queue.enqueue(JobSpec("1.2", "1.2.3", ("1.2.3.4",), pipeline="p", model="m", model_version="1"))
    return queue


def test_run_once_completes_the_job_with_its_step_timings(clock: FakeClock) -> None:
    queue = queue_with_job(clock=clock)
    seen: list[Job] = []

    def runner(job: Job, timings: dict[str, float]) -> dict:
        seen.append(job)
        timings["collect"] = 0.25
        return {"predictions": [{"positives": ["nodule"]}]}

    job = Worker(queue, runner, "w").run_once()
    assert job is not None and job.state == JobState.DONE and job.timings == {"collect": 0.25}
    assert job.results == {"predictions": [{"positives": ["nodule"]}]}
    assert seen[0].state == JobState.RUNNING
    assert Worker(queue, runner, "w").run_once() is None  # nothing left


def test_failures_are_recorded_with_partial_timings(clock: FakeClock) -> None:
    queue = queue_with_job(clock=clock)

    def runner(job: Job, timings: dict[str, float]) -> None:
        timings["collect"] = 0.1
        raise PermanentError("photometric interpretation not supported")

    job = Worker(queue, runner, "w").run_once()
    assert job is not None and job.state == JobState.FAILED
    assert job.reason == "PermanentError: photometric interpretation not supported"
    assert job.timings == {"collect": 0.1}


def test_an_unexpected_error_is_retried_later(clock: FakeClock) -> None:
    queue = queue_with_job(clock=clock)

    def runner(job: Job, timings: dict[str, float]) -> None:
        raise MemoryError("out of memory")

    job = Worker(queue, runner, "w").run_once()
    assert job is not None and job.state == JobState.QUEUED and job.not_before > clock.now


def test_heartbeats_keep_a_long_job_leased() -> None:
    queue = queue_with_job(QueuePolicy(lease_seconds=0.3))
    release = threading.Event()
    expiries: list[float] = []

    def runner(job: Job, timings: dict[str, float]) -> None:
        deadline = time.monotonic() + 10
        while len(set(expiries)) < 3 and time.monotonic() < deadline:
            current = queue.get(job.id)
            assert current is not None
            expiries.append(current.lease_expires_at)
            release.wait(0.02)

    job = Worker(queue, runner, "w").run_once()
    assert len(set(expiries)) >= 3  # the lease was extended while the job ran
    assert job is not None and job.state == JobState.DONE


def test_run_until_stops_when_asked() -> None:
    queue = queue_with_job()
    stop = threading.Event()
    ran: list[int] = []

    def runner(job: Job, timings: dict[str, float]) -> None:
        ran.append(job.id)
        stop.set()

    thread = threading.Thread(target=Worker(queue, runner, "w").run_until, args=(stop, 0.01))
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and ran == [1]


def test_a_failing_heartbeat_is_retried_and_the_lease_kept() -> None:
    queue = queue_with_job(QueuePolicy(lease_seconds=0.3))
    real = queue.heartbeat
    calls: list[str] = []

    def flaky(job_id: int, worker: str) -> bool:
        calls.append("beat")
        if len(calls) == 1:
            raise RuntimeError("database is locked")
        return real(job_id, worker)

    queue.heartbeat = flaky  # type: ignore[method-assign]

    def runner(job: Job, timings: dict[str, float]) -> None:
        deadline = time.monotonic() + 10
        while len(calls) < 4 and time.monotonic() < deadline:
            threading.Event().wait(0.02)

    job = Worker(queue, runner, "w").run_once()
    assert len(calls) >= 4  # beating went on after the error
    assert job is not None and job.state == JobState.DONE


def test_a_waiting_worker_wakes_for_new_work_without_waiting_its_poll() -> None:
    queue = JobQueue(MemoryJobBackend(), POLICY)
    stop, wake, done = threading.Event(), threading.Event(), threading.Event()

    def runner(job: Job, timings: dict[str, float]) -> None:
        done.set()

    thread = threading.Thread(target=Worker(queue, runner, "w").run_until, args=(stop, 60.0, wake))
    thread.start()
    try:
        time.sleep(0.2)  # the worker found nothing and waits (60 s poll)
        queue.enqueue(JobSpec("1.2", "1.2.3", ("1.2.3.4",), pipeline="p", model="m", model_version="1"))
        started = time.monotonic()
        wake.set()
        assert done.wait(10) and time.monotonic() - started < 5
    finally:
        stop.set()
        wake.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_worker_claims_nothing_while_its_executor_can_run_no_model(clock: FakeClock) -> None:
    """The Ray cluster down: ``RayExecutor.claimable`` names no model."""
    queue = queue_with_job(clock=clock)
    runnable: set[str] = set()
    ran: list[Job] = []

    def runner(job: Job, timings: dict[str, float]) -> dict:
        ran.append(job)
        return {}

    worker = Worker(queue, runner, "w", models=lambda: runnable)
    assert worker.run_once() is None and ran == []
    [job] = queue.list()
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)  # waiting costs no attempt
    runnable.add(job.model)
    done = worker.run_once()
    assert done is not None and done.state == JobState.DONE and done.attempts == 1



@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_worker_claims_only_the_jobs_of_the_models_that_can_run(tmp_path, clock: FakeClock, kind: str) -> None:
    """One model without a live actor holds back its own jobs, not the others'."""
    backend = MemoryJobBackend() if kind == "memory" else SQLiteJobBackend(tmp_path / "jobs.db")
    queue = JobQueue(backend, POLICY, clock=clock)
    for model in ("a", "b"):  # a's job is the older one
        queue.enqueue(JobSpec("1.2", f"1.2.{model == 'b'}", ("1.2.3.4",), pipeline=model, model=model,
                              model_version="1"))
    runnable: set[str] = {"b"}
    ran: list[str] = []

    def runner(job: Job, timings: dict[str, float]) -> dict:
        ran.append(job.model)
        return {}

    worker = Worker(queue, runner, "w", models=lambda: runnable)
    assert worker.run_once() is not None and worker.run_once() is None and ran == ["b"]
    [waiting] = [j for j in queue.list() if j.model == "a"]
    assert (waiting.state, waiting.attempts) == (JobState.QUEUED, 0)
    runnable.clear()
    assert worker.run_once() is None  # nothing can run: nothing is claimed
    runnable.update({"a", "b"})
    assert worker.run_once() is not None and ran == ["b", "a"]
    backend.close()

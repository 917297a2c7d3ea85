"""The queue's rules, stepped by hand on both backends: leases, retries, dead letters, idempotency."""

from pathlib import Path

import pytest

from dicom_node.errors import InfrastructureError, PermanentError, RetryableError, UnavailableError
from dicom_node.jobs.queue import Job, JobError, JobQueue, JobSpec, JobState
from dicom_node.jobs.sqlite import SQLiteJobBackend
from tests.jobs.conftest import POLICY, FakeClock


def spec(series: str = "1.2.3", instances: tuple[str, ...] = ("1.2.3.1", "1.2.3.2"), **kw) -> JobSpec:
    return JobSpec(study_instance_uid="1.2", series_instance_uid=series, instance_uids=instances,
                   pipeline=kw.pop("pipeline", "chest"), model="demo", model_version="1", **kw)


def test_same_work_is_queued_once_and_new_instances_make_a_new_version(queue: JobQueue) -> None:
    first = queue.enqueue(spec())
    assert first is not None and first.state == JobState.QUEUED and first.version == 1
    assert queue.enqueue(spec(instances=("1.2.3.2", "1.2.3.1"))) is None  # order does not matter
    second = queue.enqueue(spec(instances=("1.2.3.1", "1.2.3.2", "1.2.3.3")))
    assert second is not None and second.version == 2
    other_pipeline = queue.enqueue(spec(pipeline="other"))
    assert other_pipeline is not None and other_pipeline.version == 1
    assert len(queue.list()) == 3


def test_claim_takes_the_oldest_due_job_under_a_lease(queue: JobQueue, clock: FakeClock) -> None:
    a = queue.enqueue(spec("1.1"))
    b = queue.enqueue(spec("1.2"))
    assert a and b
    job = queue.claim("w1")
    assert job is not None and job.id == a.id and job.state == JobState.RUNNING
    assert job.attempts == 1 and job.lease_owner == "w1"
    assert job.lease_expires_at == clock.now + POLICY.lease_seconds
    assert queue.claim("w2").id == b.id  # type: ignore[union-attr]
    assert queue.claim("w3") is None


def test_expired_lease_requeues_the_job_and_the_old_worker_cannot_finish_it(
    queue: JobQueue, clock: FakeClock
) -> None:
    queue.enqueue(spec())
    first = queue.claim("dead-worker")
    assert first is not None
    clock.advance(POLICY.lease_seconds - 1)
    assert queue.claim("w2") is None  # lease still valid
    clock.advance(2)
    second = queue.claim("w2")
    assert second is not None and second.id == first.id and second.attempts == 2
    assert "lease expired" in second.reason
    assert not queue.complete(first.id, "dead-worker")
    assert queue.complete(second.id, "w2", {"collect": 0.5}, {"predictions": []})
    done = queue.get(first.id)
    assert done is not None and done.state == JobState.DONE and done.timings == {"collect": 0.5}
    assert done.results == {"predictions": []}


def test_heartbeat_keeps_the_lease(queue: JobQueue, clock: FakeClock) -> None:
    queue.enqueue(spec())
    job = queue.claim("w1")
    assert job is not None
    for _ in range(3):
        clock.advance(POLICY.lease_seconds * 0.9)
        assert queue.heartbeat(job.id, "w1")
        assert queue.claim("w2") is None
    assert not queue.heartbeat(job.id, "w2")


def test_retryable_failures_back_off_exponentially_then_the_job_is_dead(
    queue: JobQueue, clock: FakeClock
) -> None:
    queue.enqueue(spec())
    delays = []
    for attempt in range(1, POLICY.max_attempts + 1):
        job = queue.claim("w")
        assert job is not None and job.attempts == attempt
        after = queue.fail(job.id, "w", RetryableError("PACS busy"), {"collect": 0.1})
        assert after is not None
        if after.state == JobState.DEAD:
            break
        delays.append(after.not_before - clock.now)
        assert queue.claim("w") is None  # not due yet
        clock.advance(after.not_before - clock.now)
    assert delays == [10, 20]  # 10 * 2**(attempt-1)
    assert after.state == JobState.DEAD and after.attempts == POLICY.max_attempts
    assert "RetryableError: PACS busy" in after.reason and "after 3 attempts" in after.reason
    assert after.timings == {"collect": 0.1}
    assert queue.claim("w") is None


def test_backoff_is_capped(queue: JobQueue) -> None:
    assert [POLICY.backoff(n) for n in (1, 2, 3, 4)] == [10, 20, 25, 25]


def test_unexpected_errors_are_retried_like_retryable_ones(queue: JobQueue) -> None:
    queue.enqueue(spec())
    job = queue.claim("w")
    assert job is not None
    after = queue.fail(job.id, "w", ZeroDivisionError("bug"))
    assert after is not None and after.state == JobState.QUEUED and "ZeroDivisionError" in after.reason


def test_permanent_error_fails_at_once_with_its_reason(queue: JobQueue) -> None:
    queue.enqueue(spec())
    job = queue.claim("w")
    assert job is not None
    after = queue.fail(job.id, "w", PermanentError("wrong modality for the model"))
    assert after is not None and after.state == JobState.FAILED and after.attempts == 1
    assert after.reason == "PermanentError: wrong modality for the model"


def test_requeue_by_an_operator(queue: JobQueue) -> None:
    queue.enqueue(spec("1.1"))
    queue.enqueue(spec("1.2"))
    a, b = queue.claim("w"), queue.claim("w")
    assert a and b
    with pytest.raises(JobError, match="is running"):
        queue.requeue(a.id)
    queue.fail(a.id, "w", PermanentError("x"))
    queue.complete(b.id, "w")
    again = queue.requeue(a.id)
    assert again.state == JobState.QUEUED and again.attempts == 0
    assert queue.requeue(b.id).state == JobState.QUEUED  # a done job may be run again
    with pytest.raises(JobError, match="does not exist"):
        queue.requeue(999)


def test_requeue_failed_takes_failed_and_dead(queue: JobQueue) -> None:
    for series in ("1.1", "1.2", "1.3"):
        queue.enqueue(spec(series))
    jobs = [queue.claim("w") for _ in range(3)]
    queue.fail(jobs[0].id, "w", PermanentError("x"))  # type: ignore[union-attr]
    queue.complete(jobs[1].id, "w")  # type: ignore[union-attr]
    assert [j.id for j in queue.requeue_failed()] == [jobs[0].id]  # type: ignore[union-attr]


def test_release_running_after_a_crash_counts_the_attempt(queue: JobQueue) -> None:
    queue.enqueue(spec())
    for _ in range(POLICY.max_attempts):
        assert queue.claim("w") is not None
        assert queue.release_running() == 1
    [job] = queue.list()
    assert job.state == JobState.DEAD and "node stopped" in job.reason  # no endless crash loop


def test_not_routed_records_never_run(queue: JobQueue) -> None:
    record = queue.enqueue(spec(pipeline="", state=JobState.NOT_ROUTED, reason="no pipeline matches"))
    assert record is not None and record.state == JobState.NOT_ROUTED
    assert queue.claim("w") is None
    assert queue.list(JobState.NOT_ROUTED)[0].reason == "no pipeline matches"


def test_sqlite_queue_survives_reopening(tmp_path: Path, clock: FakeClock) -> None:
    backend = SQLiteJobBackend(tmp_path / "index.sqlite")
    queue = JobQueue(backend, POLICY, clock=clock)
    job = queue.enqueue(spec())
    assert job is not None and queue.claim("w") is not None
    backend.close()

    backend = SQLiteJobBackend(tmp_path / "index.sqlite")
    try:
        reopened = JobQueue(backend, POLICY, clock=clock)
        again = reopened.get(job.id)
        assert again is not None and again.state == JobState.RUNNING and again.lease_owner == "w"
        assert again.instance_uids == ("1.2.3.1", "1.2.3.2")
        assert reopened.enqueue(spec()) is None  # idempotency survives too
    finally:
        backend.close()


def test_an_unavailable_compute_hands_the_job_back_without_counting_the_attempt(
    queue: JobQueue, clock: FakeClock
) -> None:
    """A lost Ray cluster is not the job's failure: no attempt is spent (the workers claim no job
    while it is down, so a job is handed back only when it was running as it went), while other
    retryable errors still count."""
    queue.enqueue(spec())
    for handed in range(1, POLICY.max_handbacks):
        job = queue.claim("w1")
        assert job is not None and job.attempts == 1
        after = queue.fail(job.id, "w1", UnavailableError("the Ray cluster was lost"))
        assert after is not None and after.state == JobState.QUEUED and after.attempts == 0
        assert after.lease_owner == "" and "UnavailableError" in after.reason and after.handbacks == handed
        assert queue.claim("w2") is None  # a short backoff, not a busy loop
        clock.advance(POLICY.backoff(1))
    job = queue.claim("w1")
    assert job is not None
    after = queue.fail(job.id, "w1", InfrastructureError("the Ray actor was lost"))
    assert after is not None and after.attempts == 1  # an actor lost mid-job still counts


def test_a_job_handed_back_max_handbacks_times_in_a_row_spends_an_attempt(
    queue: JobQueue, clock: FakeClock
) -> None:
    """The backstop against a poison job that brings its compute down at every try (and so is
    handed back uncounted each time): it ends dead after ``max_attempts`` rounds."""
    queue.enqueue(spec())
    tries = 0
    while (job := queue.claim("w1")) is not None or queue.list(JobState.QUEUED):
        if job is None:
            clock.advance(POLICY.max_backoff_seconds)
            continue
        tries += 1
        after = queue.fail(job.id, "w1", UnavailableError("the Ray cluster was lost"))
        assert after is not None and tries <= 100
        assert after.handbacks == tries % POLICY.max_handbacks  # back to 0 as the attempt counts
    [dead] = queue.list(JobState.DEAD)
    assert tries == POLICY.max_attempts * POLICY.max_handbacks and dead.attempts == POLICY.max_attempts
    assert f"handed back {POLICY.max_handbacks} times in a row: this attempt counts" in dead.reason


def test_a_counted_failure_starts_the_hand_backs_over(queue: JobQueue, clock: FakeClock) -> None:
    """Hand-backs count "in a row": one short of the backstop, then an attempt that counts for
    another reason; the next hand-back is the first of a new run, not the one that counts."""
    queue.enqueue(spec())

    def claim() -> Job:
        clock.advance(POLICY.max_backoff_seconds)
        job = queue.claim("w1")
        assert job is not None
        return job

    for _ in range(POLICY.max_handbacks - 1):
        queue.fail(claim().id, "w1", UnavailableError("the Ray cluster was lost"))
    counted = queue.fail(claim().id, "w1", RetryableError("the actor died"))
    assert counted is not None and counted.attempts == 1 and counted.handbacks == 0
    after = queue.fail(claim().id, "w1", UnavailableError("the Ray cluster was lost"))
    assert after is not None and after.attempts == 1 and after.handbacks == 1
    assert "in a row" not in after.reason


def test_a_claim_for_some_models_takes_their_oldest_due_job(queue: JobQueue, clock: FakeClock) -> None:
    """Another model's jobs (its Ray actors down) wait, spending nothing; among the models asked
    for, the oldest due job goes first, whichever model it is."""
    jobs = [queue.enqueue(JobSpec("1.2", f"1.2.{i}", (f"1.2.{i}.1",), "p", model, "1"))
            for i, model in enumerate(["dead", "b", "a", "b", "dead"])]
    assert all(jobs)
    first = queue.claim("w", ["a", "b"])
    assert first is not None and first.id == jobs[1].id  # type: ignore[union-attr]
    queue.fail(first.id, "w", RetryableError("busy"))  # not due again until its backoff passes
    assert [queue.claim("w", {"a", "b"}).id for _ in range(2)] == [jobs[2].id, jobs[3].id]  # type: ignore[union-attr]
    assert queue.claim("w", ["a", "b"]) is None and queue.claim("w", []) is None
    clock.advance(POLICY.max_backoff_seconds)
    assert queue.claim("w", ["b"]).id == jobs[1].id  # type: ignore[union-attr]
    assert {j.model for j in queue.list(JobState.QUEUED)} == {"dead"}


def test_a_claim_for_some_models_reads_only_their_jobs(tmp_path: Path) -> None:
    """At 100k queued jobs of a model without actors a claim for another took 26 ms scanning
    them (bench/next_due.py): it goes through the index on (state, model, id)."""
    backend = SQLiteJobBackend(tmp_path / "index.sqlite")
    plan = " ".join(str(row) for row in backend.conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM jobs INDEXED BY jobs_by_model WHERE state = 'queued' AND model = ? "
        "AND not_before <= ? ORDER BY id LIMIT 1", ("a", 1.0)).fetchall())
    backend.close()
    assert "jobs_by_model (state=? AND model=?)" in plan and "TEMP B-TREE" not in plan, plan

"""The durable job queue: job states, leases, retries with backoff, dead letters, idempotency.

:class:`JobQueue` holds the rules; a :class:`JobBackend` (SQLite by default, in memory for tests)
only loads and saves records inside a transaction. States::

    queued --claim--> running --complete--> done
      ^                 |  \\--fail(PermanentError)--> failed
      |                 |  \\--fail(other), attempts left--> queued (not before now + backoff)
      |                 |  \\--fail(other) or lease lost, no attempts left--> dead
      +--lease expired / node restarted (an attempt spent)--+
    failed | dead | done --requeue (operator)--> queued
    not_routed: recorded for a series no pipeline matched; never runs
"""

import dataclasses
import hashlib
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from dicom_node.errors import DicomNodeError, PermanentError, UnavailableError


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"
    NOT_ROUTED = "not_routed"


REQUEUEABLE = frozenset({JobState.FAILED, JobState.DEAD, JobState.DONE})
#: States in which a job will not run again by itself (an operator may requeue it).
FINISHED = frozenset({JobState.DONE, JobState.FAILED, JobState.DEAD, JobState.NOT_ROUTED})


class JobError(DicomNodeError):
    """An operation on a job that its state does not allow (e.g. requeue of a running job)."""


@dataclass(frozen=True)
class JobSpec:
    """The work for one series and one pipeline, as the scheduler asks for it."""

    study_instance_uid: str
    series_instance_uid: str
    instance_uids: tuple[str, ...]
    pipeline: str = ""
    model: str = ""
    model_version: str = ""
    state: JobState = JobState.QUEUED
    reason: str = ""

    @property
    def key(self) -> str:
        """Idempotency key: the same series, instances, pipeline and model version are one job."""
        return job_key(self.study_instance_uid, self.series_instance_uid, self.instance_uids, self.pipeline,
                       self.model, self.model_version)


def job_key(study_instance_uid: str, series_instance_uid: str, instance_uids: Sequence[str], pipeline: str,
            model: str, model_version: str) -> str:
    """The idempotency key of a job: a hash of the series (its study and Series Instance UID: two
    studies sharing a Series Instance UID are two series), its instances, pipeline and model version."""
    parts = [study_instance_uid, series_instance_uid, *sorted(instance_uids), pipeline, model, model_version]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Job:
    """One job record."""

    id: int
    key: str
    study_instance_uid: str
    series_instance_uid: str
    instance_uids: tuple[str, ...]
    pipeline: str
    model: str
    model_version: str
    version: int
    state: JobState
    reason: str
    attempts: int
    not_before: float
    lease_owner: str
    lease_expires_at: float
    created_at: float
    updated_at: float
    finished_at: float
    timings: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)  # what the pipeline found (JSON-able)
    handbacks: int = 0  # attempts handed back uncounted since the last counted one (UnavailableError)


@dataclass(frozen=True)
class QueuePolicy:
    """Retries and leases. ``backoff_seconds * 2**(attempt-1)``, capped, between attempts.

    ``max_handbacks``: an attempt handed back uncounted (:class:`UnavailableError`: the compute
    was out of reach) that many times in a row counts after all, so a job that itself brings
    its compute down each time (a poison job) ends after ``max_attempts`` instead of looping.
    """

    max_attempts: int = 5
    backoff_seconds: float = 10.0
    max_backoff_seconds: float = 600.0
    lease_seconds: float = 60.0
    max_handbacks: int = 5

    def backoff(self, attempts: int) -> float:
        return float(min(self.max_backoff_seconds, self.backoff_seconds * 2 ** max(0, attempts - 1)))


class JobBackend(Protocol):
    """Storage of job records; every call happens inside :meth:`transaction`."""

    def transaction(self) -> AbstractContextManager[None]: ...
    def close(self) -> None: ...
    def insert(self, spec: JobSpec, version: int, now: float) -> Job | None: ...
    def versions(self, study_instance_uid: str, series_instance_uid: str, pipeline: str) -> int: ...
    def series_jobs(self, study_instance_uid: str, series_instance_uid: str,
                    pipeline: str | None) -> list[Job]: ...
    def get(self, job_id: int) -> Job | None: ...
    def save(self, job: Job) -> None: ...
    def select(self, states: Sequence[JobState], limit: int | None = None) -> list[Job]: ...
    def next_due(self, now: float, models: Collection[str] | None = None) -> Job | None: ...
    def expired(self, now: float) -> list[Job]: ...
    def watermark(self) -> float: ...
    def set_watermark(self, value: float) -> None: ...


class JobQueue:
    """enqueue, claim, heartbeat, complete, fail, requeue, list: the queue's whole interface.

    Parameters
    ----------
    backend
        Where records live (:class:`~dicom_node.jobs.sqlite.SQLiteJobBackend` or
        :class:`~dicom_node.jobs.memory.MemoryJobBackend`).
    policy
        Retries, backoff and lease length.
    clock
        Seconds since the epoch; injectable so tests step time instead of sleeping.
    """

    def __init__(
        self, backend: JobBackend, policy: QueuePolicy = QueuePolicy(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.policy = policy
        self.clock = clock

    def enqueue(self, spec: JobSpec) -> Job | None:
        """Record a job; None if a job with the same idempotency key exists already."""
        with self.backend.transaction():
            version = self.backend.versions(spec.study_instance_uid, spec.series_instance_uid,
                                            spec.pipeline) + 1
            return self.backend.insert(spec, version, self.clock())

    def claim(self, worker: str, models: Collection[str] | None = None) -> Job | None:
        """Take the oldest queued job that is due, under a lease for ``worker``; with ``models``,
        the oldest of those models' jobs (the others wait for their compute, spending nothing)."""
        now = self.clock()
        with self.backend.transaction():
            for job in self.backend.expired(now):
                self._interrupted(job, now, "lease expired: its worker stopped answering")
            oldest = self.backend.next_due(now, models)
            if oldest is None:
                return None
            job = dataclasses.replace(
                oldest, state=JobState.RUNNING, attempts=oldest.attempts + 1, lease_owner=worker,
                lease_expires_at=now + self.policy.lease_seconds, updated_at=now,
            )
            self.backend.save(job)
            return job

    def heartbeat(self, job_id: int, worker: str) -> bool:
        """Extend ``worker``'s lease; False if the job is no longer its to run."""
        now = self.clock()
        return self._update_leased(job_id, worker, lease_expires_at=now + self.policy.lease_seconds,
                                   updated_at=now)

    def complete(
        self, job_id: int, worker: str, timings: dict[str, float] | None = None,
        results: dict[str, Any] | None = None,
    ) -> bool:
        """Mark a job done with its timings and results; False (and nothing changes) if
        ``worker`` lost its lease."""
        now = self.clock()
        return self._update_leased(
            job_id, worker, state=JobState.DONE, reason="", handbacks=0, lease_owner="", lease_expires_at=0.0,
            updated_at=now, finished_at=now, timings=timings or {}, results=results or {},
        )

    def _update_leased(self, job_id: int, worker: str, **changes: object) -> bool:
        with self.backend.transaction():
            job = self._leased(job_id, worker)
            if job is None:
                return False
            self.backend.save(dataclasses.replace(job, **changes))  # type: ignore[arg-type]
            return True

    def fail(
        self, job_id: int, worker: str, error: BaseException, timings: dict[str, float] | None = None
    ) -> Job | None:
        """Record a failed attempt: PermanentError fails at once, UnavailableError (the compute
        is out of reach) hands the job back without counting the attempt, anything else is retried
        with backoff until ``max_attempts``, then the job is dead. None if the lease was lost."""
        now = self.clock()
        reason = f"{type(error).__name__}: {error}"
        with self.backend.transaction():
            job = self._leased(job_id, worker)
            if job is None:
                return None
            job = dataclasses.replace(job, timings=timings or job.timings)
            if isinstance(error, PermanentError):
                job = self._finish(job, JobState.FAILED, reason, now)
            elif isinstance(error, UnavailableError):
                job = self._hand_back(job, reason, now)
            else:
                job = self._retry_or_bury(job, reason, now)
            self.backend.save(job)
            return job

    def _hand_back(self, job: Job, reason: str, now: float) -> Job:
        """Not the job's attempt: back to the queue uncounted, unless it was handed back
        ``max_handbacks`` times in a row already; then the attempt counts (a job that brings
        its compute down each time must not loop forever)."""
        if job.handbacks + 1 >= self.policy.max_handbacks:
            counted = f"{reason} (handed back {job.handbacks + 1} times in a row: this attempt counts)"
            return dataclasses.replace(self._retry_or_bury(job, counted, now), handbacks=0)
        return dataclasses.replace(
            job, state=JobState.QUEUED, reason=reason, attempts=job.attempts - 1, handbacks=job.handbacks + 1,
            not_before=now + self.policy.backoff(1), lease_owner="", lease_expires_at=0.0, updated_at=now)

    def requeue(self, job_id: int) -> Job:
        """Run a failed, dead or done job again, with fresh attempts (an operator's action)."""
        with self.backend.transaction():
            job = self.backend.get(job_id)
            if job is None:
                raise JobError(f"job {job_id} does not exist")
            if job.state not in REQUEUEABLE:
                raise JobError(f"job {job_id} is {job.state}; only failed, dead or done jobs can be requeued")
            job = dataclasses.replace(
                job, state=JobState.QUEUED, reason="requeued", attempts=0, handbacks=0, not_before=0.0,
                updated_at=self.clock(), finished_at=0.0,
            )
            self.backend.save(job)
            return job

    def requeue_failed(self) -> list[Job]:
        """Requeue every failed and dead job."""
        with self.backend.transaction():
            ids = [j.id for j in self.backend.select([JobState.FAILED, JobState.DEAD])]
        return [self.requeue(i) for i in ids]

    def release_running(self, reason: str = "the node stopped while it was running") -> int:
        """At start-up, before any worker runs: jobs left running by a dead process go back to
        the queue (the interrupted attempt counts). Returns how many."""
        now = self.clock()
        with self.backend.transaction():
            running = self.backend.select([JobState.RUNNING])
            for job in running:
                self._interrupted(job, now, reason)
        return len(running)

    def get(self, job_id: int) -> Job | None:
        with self.backend.transaction():
            return self.backend.get(job_id)

    def list(self, state: JobState | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first, optionally of one state."""
        with self.backend.transaction():
            return self.backend.select(list(JobState) if state is None else [state], limit)

    def versions_of(self, job: Job) -> Sequence[Job]:
        """Every version of ``job``'s series and pipeline, oldest first (``job`` among them)."""
        with self.backend.transaction():
            return self.backend.series_jobs(job.study_instance_uid, job.series_instance_uid, job.pipeline)

    def of_series(self, study_instance_uid: str, series_instance_uid: str) -> Sequence[Job]:
        """Every job of a series, all pipelines and versions (``not_routed`` records too)."""
        with self.backend.transaction():
            return self.backend.series_jobs(study_instance_uid, series_instance_uid, None)

    def current(self, jobs: Sequence[Job]) -> set[int]:
        """The ids of those of ``jobs`` that are the newest version of their series and pipeline
        (a later instance makes a new version; the earlier ones are superseded)."""
        with self.backend.transaction():
            newest = {key: self.backend.versions(*key) for key in
                      {(j.study_instance_uid, j.series_instance_uid, j.pipeline) for j in jobs}}
        return {j.id for j in jobs
                if j.version == newest[(j.study_instance_uid, j.series_instance_uid, j.pipeline)]}

    def _leased(self, job_id: int, worker: str) -> Job | None:
        job = self.backend.get(job_id)
        if job is None or job.state != JobState.RUNNING or job.lease_owner != worker:
            return None
        return job

    def _interrupted(self, job: Job, now: float, reason: str) -> None:
        self.backend.save(self._retry_or_bury(job, reason, now, immediately=True))

    def _retry_or_bury(self, job: Job, reason: str, now: float, immediately: bool = False) -> Job:
        if job.attempts >= self.policy.max_attempts:
            return self._finish(job, JobState.DEAD, f"{reason} (after {job.attempts} attempts)", now)
        delay = 0.0 if immediately else self.policy.backoff(job.attempts)
        return dataclasses.replace(
            job, state=JobState.QUEUED, reason=reason, not_before=now + delay, lease_owner="",
            lease_expires_at=0.0, updated_at=now, handbacks=0,  # an attempt counted: hand-backs start over
        )

    @staticmethod
    def _finish(job: Job, state: JobState, reason: str, now: float) -> Job:
        return dataclasses.replace(
            job, state=state, reason=reason, lease_owner="", lease_expires_at=0.0, updated_at=now,
            finished_at=now,
        )


"""An in-memory job backend, for tests and for stepping the queue without a database."""

import dataclasses
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

from dicom_node.jobs.queue import Job, JobSpec, JobState


class MemoryJobBackend:
    """Job records in a dict; one re-entrant lock is the transaction."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._lock = threading.RLock()
        self._watermark = 0.0

    def close(self) -> None:
        """Nothing to release."""

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            yield

    def insert(self, spec: JobSpec, version: int, now: float) -> Job | None:
        key = spec.key
        if any(j.key == key for j in self._jobs.values()):
            return None
        job = Job(
            id=len(self._jobs) + 1, key=key, study_instance_uid=spec.study_instance_uid,
            series_instance_uid=spec.series_instance_uid, instance_uids=spec.instance_uids,
            pipeline=spec.pipeline, model=spec.model, model_version=spec.model_version,
            version=version, state=spec.state, reason=spec.reason, attempts=0, not_before=0.0,
            lease_owner="", lease_expires_at=0.0, created_at=now, updated_at=now,
            finished_at=now if spec.state == JobState.NOT_ROUTED else 0.0,
        )
        self._jobs[job.id] = job
        return job

    def versions(self, study_instance_uid: str, series_instance_uid: str, pipeline: str) -> int:
        return sum(1 for j in self._jobs.values()
                   if (j.study_instance_uid, j.series_instance_uid, j.pipeline)
                   == (study_instance_uid, series_instance_uid, pipeline))

    def series_jobs(self, study_instance_uid: str, series_instance_uid: str,
                    pipeline: str | None) -> list[Job]:
        return sorted((j for j in self._jobs.values()
                       if j.study_instance_uid == study_instance_uid
                       and j.series_instance_uid == series_instance_uid and pipeline in (None, j.pipeline)),
                      key=lambda j: (j.version, j.id))

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def save(self, job: Job) -> None:
        self._jobs[job.id] = dataclasses.replace(job, timings=dict(job.timings),
                                                 results=dict(job.results))

    def select(self, states: Sequence[JobState], limit: int | None = None) -> list[Job]:
        jobs = sorted((j for j in self._jobs.values() if j.state in states), key=lambda j: -j.id)
        return jobs[:limit] if limit is not None else jobs

    def next_due(self, now: float, models: Collection[str] | None = None) -> Job | None:
        due = [j for j in self._jobs.values() if j.state == JobState.QUEUED and j.not_before <= now
               and (models is None or j.model in models)]
        return min(due, key=lambda j: j.id) if due else None

    def expired(self, now: float) -> list[Job]:
        return [j for j in self._jobs.values()
                if j.state == JobState.RUNNING and j.lease_expires_at < now]

    def watermark(self) -> float:
        return self._watermark

    def set_watermark(self, value: float) -> None:
        self._watermark = value

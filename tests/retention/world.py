"""A node's data folder built in code for the retention tests: stored instances, jobs in every
state, results and their outbox records, all on one injected clock."""

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dicom_node.config import RetentionSettings
from dicom_node.export.outbox import DeliveryState, Outbox, OutboxRecord, Result
from dicom_node.jobs.queue import Job, JobQueue, JobSpec, JobState
from dicom_node.jobs.sqlite import SQLiteJobBackend
from dicom_node.retention import Planner, Purger, Retention
from dicom_node.retention.disk import UsageReader, read_usage
from dicom_node.store import InstanceRecord, InstanceStore
from dicom_node.store.db import DATABASE_NAME
from dicom_node.store.results import ResultArea
from tests.factories import ct_dataset, new_uid
from tests.store.test_store import put

DAY = 86400.0
START = 1_700_000_000.0


@dataclass
class Clock:
    now: float = START

    def __call__(self) -> float:
        return self.now


@dataclass
class Events:
    """An audit sink that keeps what it is given."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for e, f in self.events if e == event]


class World:
    """Store, job queue, outbox, result area and purger over one data folder and one clock."""

    def __init__(self, data_dir: Path, clock: Clock | None = None, min_free_space: int = 0) -> None:
        self.data_dir = data_dir
        self.clock = clock or Clock()
        self.audit = Events()
        self.store = InstanceStore(data_dir, min_free_space, clock=self.clock, audit=self.audit)
        database = data_dir / DATABASE_NAME
        self.queue = JobQueue(SQLiteJobBackend(database), clock=self.clock)
        self.outbox = Outbox(database, clock=self.clock)
        self.results = ResultArea(data_dir / "results")
        self.purger = Purger(database, self.store, self.outbox, self.results, self.audit, self.clock)

    def close(self) -> None:
        self.purger.close()
        self.outbox.close()
        self.queue.backend.close()
        self.store.close()

    def retention(self, settings: RetentionSettings, usage: UsageReader = read_usage,
                  grace_seconds: float = 0.0) -> Retention:
        planner = Planner(self.store.index, self.queue, self.outbox, self.results, grace_seconds,
                          self.clock)
        return Retention(settings, planner, self.purger, self.data_dir, usage, self.clock)

    def series(self, count: int = 2, size: int = 16) -> list[InstanceRecord]:
        """``count`` instances of a new series of a new study, received now."""
        study, series = new_uid(), new_uid()
        return [put(self.store, ct_dataset(study, series, size=size, seed=i)) for i in range(count)]

    def job(self, records: Sequence[InstanceRecord], state: JobState, pipeline: str = "chest",
            model_version: str = "1") -> Job:
        """A job over ``records`` taken to ``state`` (queued, running, done, failed, dead, not_routed);
        another ``model_version`` makes a new version of the same series' job."""
        first = records[0]
        spec = JobSpec(first.study_instance_uid, first.series_instance_uid,
                       tuple(sorted(r.sop_instance_uid for r in records)), pipeline, "demo", model_version,
                       state=JobState.NOT_ROUTED if state == JobState.NOT_ROUTED else JobState.QUEUED)
        job = self.queue.enqueue(spec)
        assert job is not None
        if state in (JobState.QUEUED, JobState.NOT_ROUTED):
            return job
        # the state written as a worker leaves it (claim would take the oldest queued job, not this one)
        finished = self.clock.now if state != JobState.RUNNING else 0.0
        with self.queue.backend.transaction():
            self.queue.backend.save(replace(job, state=state, attempts=1, finished_at=finished,
                                            lease_owner="w" if state == JobState.RUNNING else ""))
        found = self.queue.get(job.id)
        assert found is not None and found.state == state
        return found

    def result(self, job: Job, *states: DeliveryState) -> Path:
        """A result file of ``job`` written now, queued for one destination per state in ``states``
        (none: a pipeline without ``send_to``), each record taken to its state."""
        ds = ct_dataset(job.study_instance_uid, new_uid())
        path = self.store.save_result(ds)  # written and indexed, as the pipeline's store step does
        os.utime(path, (self.clock.now, self.clock.now))
        names = [f"dest{i}" for i in range(len(states))]
        self.outbox.enqueue(job.id, [Result(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                            job.study_instance_uid, path)], names)
        mine = self.outbox.for_instances([str(ds.SOPInstanceUID)])[str(ds.SOPInstanceUID)]
        for record, state in zip(sorted(mine, key=lambda r: r.destination), states, strict=True):
            settle(self.outbox, record, state)
        return path


def settle(outbox: Outbox, record: OutboxRecord, state: DeliveryState) -> None:
    """Take a pending record to ``state`` the way the exporter does."""
    if state == DeliveryState.PENDING:
        return
    sent = outbox.sending(record)
    assert sent is not None
    done = {DeliveryState.DELIVERED: lambda: outbox.delivered(sent),
            DeliveryState.DEAD: lambda: outbox.dead(sent, "0xA900"),
            DeliveryState.UNCONFIRMED: lambda: outbox.unconfirmed(sent, "no response")}[state]()
    assert done

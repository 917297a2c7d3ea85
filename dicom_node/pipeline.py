"""The one place that chains the steps for one job.

A step is a named function of a :class:`PipelineContext`; :func:`run` calls them in order and
records each one's duration on the job. Steps are passed in, so tests (and later modules) add
their own without global registries. Today the chain is: collect the series' instances
(inference, explanations, encoding and export are added by their own modules).
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dicom_node.config import Settings
from dicom_node.errors import PermanentError
from dicom_node.jobs.queue import Job
from dicom_node.store import InstanceRecord, InstanceStore


@dataclass
class PipelineContext:
    """What steps read and what they hand to the steps after them."""

    job: Job
    settings: Settings
    store: InstanceStore
    instances: list[InstanceRecord] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)


Step = Callable[[PipelineContext], None]


def collect(ctx: PipelineContext) -> None:
    """Load the records of the job's instances; a missing instance or file fails permanently."""
    records = []
    for uid in ctx.job.instance_uids:
        record = ctx.store.index.get(uid)
        if record is None:
            raise PermanentError(f"instance {uid} of the job is no longer stored")
        if not ctx.store.path_of(record).is_file():
            raise PermanentError(f"file of instance {uid} is missing from the store")
        records.append(record)
    ctx.instances = records


def default_steps() -> list[tuple[str, Step]]:
    """The steps every job runs, in order."""
    return [("collect", collect)]


def run(
    job: Job, timings: dict[str, float], *, settings: Settings, store: InstanceStore,
    steps: Sequence[tuple[str, Step]],
) -> PipelineContext:
    """Run ``steps`` for ``job``, recording each step's seconds in ``timings`` as it ends."""
    ctx = PipelineContext(job=job, settings=settings, store=store)
    for name, step in steps:
        started = time.perf_counter()
        try:
            step(ctx)
        finally:
            timings[name] = round(time.perf_counter() - started, 6)
    return ctx

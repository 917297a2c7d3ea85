"""Series completeness: a series is complete ``stable_seconds`` after its last new instance.

Each :meth:`Scheduler.tick` looks at the series whose last arrival fell between the previous
tick's cut-off and this one's (``now - stable_seconds``), routes each, and enqueues one job per
matching pipeline (or a ``not_routed`` record with the reason). The cut-off is kept in the job
database, so series that became complete while the node was down are picked up after a restart.
Instances arriving later move the series' last arrival forward: it is looked at again, and if its
set of instances changed, the idempotency key changes and a new job version is queued.
"""

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from dicom_node.config import Pipeline
from dicom_node.jobs.queue import Job, JobQueue, JobSpec, JobState
from dicom_node.jobs.routing import SeriesFacts, route
from dicom_node.store import InstanceStore, SeriesRecord

logger = logging.getLogger(__name__)

#: Each tick also re-reads this many seconds before the last cut-off, in case an index commit
#: stamped before that cut-off landed after the previous tick read; idempotency keys drop repeats.
OVERLAP_SECONDS = 5.0


class Scheduler:
    """Turns complete series into jobs.

    Parameters
    ----------
    store
        The instance store whose index is read.
    queue
        Where jobs go.
    pipelines
        The configured ``[[pipelines]]``.
    stable_seconds
        Quiet time after the last new instance before a series counts as complete.
    model_version
        Returns the version of a named model (part of the idempotency key).
    clock
        Seconds since the epoch; injectable so tests step time instead of sleeping.
    """

    def __init__(
        self, store: InstanceStore, queue: JobQueue, pipelines: Sequence[Pipeline],
        stable_seconds: float, model_version: Callable[[str], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.queue = queue
        self.pipelines = tuple(pipelines)
        self.stable_seconds = stable_seconds
        self.model_version = model_version
        self.clock = clock

    def tick(self) -> list[Job]:
        """Enqueue work for every series that became complete since the last tick."""
        cutoff = self.clock() - self.stable_seconds
        backend = self.queue.backend
        with backend.transaction():
            after = backend.watermark()
        created = []
        for series in self.store.index.series_received_between(after - OVERLAP_SECONDS, cutoff):
            created.extend(self._schedule(series))
        with backend.transaction():
            backend.set_watermark(max(after, cutoff))
        return created

    def _schedule(self, series: SeriesRecord) -> list[Job]:
        instances = self.store.index.instances(series.series_instance_uid)
        facts = SeriesFacts(
            modality=series.modality, body_part_examined=series.body_part_examined,
            series_description=series.series_description, calling_ae_title=series.calling_ae_title,
            manufacturer=series.manufacturer,
            sop_class_uids=frozenset(r.sop_class_uid for r in instances),
        )
        decision = route(facts, self.pipelines)
        base = JobSpec(
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            instance_uids=tuple(sorted(r.sop_instance_uid for r in instances)),
        )
        if not decision.pipelines:
            job = self.queue.enqueue(
                dataclasses.replace(base, state=JobState.NOT_ROUTED, reason=decision.reason))
            if job is not None:
                logger.info("series %s not routed: %s", series.series_instance_uid, decision.reason)
            return [job] if job else []
        created = []
        for pipeline in decision.pipelines:
            job = self.queue.enqueue(dataclasses.replace(
                base, pipeline=pipeline.name, model=pipeline.model,
                model_version=self.model_version(pipeline.model),
            ))
            if job is not None:
                logger.info("job %d queued: series %s (%d instances), pipeline %s, version %d",
                            job.id, job.series_instance_uid, len(job.instance_uids), job.pipeline,
                            job.version)
                created.append(job)
        return created

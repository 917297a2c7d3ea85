"""Series completeness: a series is complete ``stable_seconds`` after its last new instance.

Every stored instance gives its series a new, higher change number (``change_seq``) in the index.
Each :meth:`Scheduler.tick` reads the series changed since its watermark, routes each one whose
last arrival is at least ``stable_seconds`` old, and enqueues one job per matching pipeline (or a
``not_routed`` record with the reason). The watermark then moves up to just below the oldest
change it could not finish (a series not yet stable, or one whose scheduling failed), so nothing
is skipped, however slow a commit or however the clock steps. The watermark is kept in the job
database: series that became complete while the node was down are picked up after a restart.
Instances arriving later give the series a new change number: it is looked at again, and if its
set of instances changed, the idempotency key changes and a new job version is queued.

A series is its study and its Series Instance UID together (:class:`~dicom_node.store.SeriesKey`):
two studies that share a Series Instance UID are two series, two jobs, never one.
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
        backend = self.queue.backend
        with backend.transaction():
            watermark = int(backend.watermark())
        cutoff = self.clock() - self.stable_seconds
        created: list[Job] = []
        finished_prefix = True
        for series in self.store.index.series_changed_since(watermark):
            done = series.last_received_at <= cutoff and self._try_schedule(series, created)
            finished_prefix = finished_prefix and done
            if finished_prefix:
                watermark = series.change_seq
        with backend.transaction():
            backend.set_watermark(watermark)
        return created

    def _try_schedule(self, series: SeriesRecord, created: list[Job]) -> bool:
        try:
            created.extend(self._schedule(series))
        except Exception:
            logger.exception("could not schedule series %s of study %s; will try again",
                             series.series_instance_uid, series.study_instance_uid)
            return False
        return True

    def _schedule(self, series: SeriesRecord) -> list[Job]:
        # the study's own instances only: another study may use the same Series Instance UID
        instances = self.store.index.instances(series.key)
        if not instances:
            # emptied since it was listed (its instances moved to another study or series): the
            # series is gone, and the series that received them are scheduled on their own
            return []
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
                logger.info("series %s of study %s not routed: %s", series.series_instance_uid,
                            series.study_instance_uid, decision.reason)
            return [job] if job else []
        created = []
        for pipeline in decision.pipelines:
            job = self.queue.enqueue(dataclasses.replace(
                base, pipeline=pipeline.name, model=pipeline.model,
                model_version=self.model_version(pipeline.model),
            ))
            if job is not None:
                logger.info("job %d queued: series %s of study %s (%d instances), pipeline %s, "
                            "version %d", job.id, job.series_instance_uid, job.study_instance_uid,
                            len(job.instance_uids), job.pipeline, job.version)
                created.append(job)
        return created

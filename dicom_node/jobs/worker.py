"""Workers: threads that claim jobs, run them under a heartbeat-renewed lease, and record the end."""

import logging
import threading
from collections.abc import Callable, Collection
from typing import Any

from dicom_node.jobs.queue import Job, JobQueue

logger = logging.getLogger(__name__)

#: Runs one job; fills the dict with step name -> seconds as it goes (kept even on failure) and
#: returns the job's results (a JSON-able dict) or None.
Runner = Callable[[Job, dict[str, float]], dict[str, Any] | None]


class Worker:
    """Claims and runs jobs one at a time.

    Parameters
    ----------
    queue
        The job queue.
    runner
        Runs one job (``pipeline.run`` bound to its dependencies).
    name
        Lease owner name, unique per worker (e.g. ``"node-1234/worker-0"``).
    models
        The models whose jobs can run now (e.g. those with a free Ray actor; none while the
        cluster is down), or None for all: only their jobs are claimed; the others wait,
        spending no attempt.
    """

    def __init__(self, queue: JobQueue, runner: Runner, name: str,
                 models: Callable[[], Collection[str]] | None = None) -> None:
        self.queue = queue
        self.runner = runner
        self.name = name
        self.models = models

    def run_once(self) -> Job | None:
        """Claim one due job and run it to its end; None if nothing was due (or nothing can run)."""
        models = self.models() if self.models is not None else None
        if models is not None and not models:
            return None
        job = self.queue.claim(self.name, models)
        if job is None:
            return None
        logger.info("job %d started (attempt %d): series %s of study %s, pipeline %s", job.id, job.attempts,
                    job.series_instance_uid, job.study_instance_uid, job.pipeline)
        timings: dict[str, float] = {}
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, done), daemon=True,
                                name=f"{self.name}-heartbeat")
        beat.start()
        try:
            results = self.runner(job, timings)
        except Exception as exc:
            done.set()
            after = self.queue.fail(job.id, self.name, exc, timings)
            state = after.state if after else "lost its lease"
            logger.warning("job %d attempt %d failed (%s): %s", job.id, job.attempts, state, exc)
        else:
            done.set()
            if self.queue.complete(job.id, self.name, timings, results):
                logger.info("job %d done in %.2f s", job.id, sum(timings.values()))
            else:
                logger.warning("job %d finished after its lease was lost; result not recorded", job.id)
        finally:
            done.set()
            beat.join()
        return self.queue.get(job.id)

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        """Renew the lease every third of it; an error (database busy) is retried, not fatal."""
        interval = self.queue.policy.lease_seconds / 3
        while not done.wait(interval):
            try:
                if not self.queue.heartbeat(job_id, self.name):
                    logger.warning("job %d: lease lost; its result will not be recorded", job_id)
                    return
            except Exception:
                logger.exception("job %d: heartbeat failed; trying again", job_id)

    def run_until(self, stop: threading.Event, poll_seconds: float = 1.0,
                  wake: threading.Event | None = None) -> None:
        """Run jobs until ``stop`` is set; the job in hand is finished first. With nothing to do,
        wait ``poll_seconds``, or until ``wake`` is set (new jobs were queued)."""
        while not stop.is_set():
            try:
                ran = self.run_once()
            except Exception:
                logger.exception("worker %s: unexpected error; continuing", self.name)
                ran = None
            if ran is None:
                if wake is None:
                    stop.wait(poll_seconds)
                else:
                    wake.wait(poll_seconds)
                    wake.clear()

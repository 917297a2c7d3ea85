"""The retention policy at work: by age every ``interval_seconds``, by disk space whenever the disk
is above a purge mark (checked every ``disk_check_seconds``), and once from ``dicom-node purge``."""

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from dicom_node.config import RetentionSettings
from dicom_node.jobs.queue import QueuePolicy
from dicom_node.retention.disk import DiskMarks, UsageReader, read_usage
from dicom_node.retention.purge import Intent, Outcome, Purger, batches
from dicom_node.retention.rules import Candidate, Kept, Kind, Planner, take_bytes

logger = logging.getLogger(__name__)

#: Candidates per batch of intents: each batch is one transaction of intents, then its deletions.
BATCH = 200
#: After a purge for space found nothing more that may go, the node looks again this much later,
#: not at every disk check: each look reads the whole index.
STUCK_RETRY_SECONDS = 60.0
#: A purge for space deletes at most the excess it first read plus this share of it per round:
#: free space that does not come back (snapshots, files held open) must not empty the store.
MARGIN = 0.1
#: A batch that frees less than this share of the bytes it deleted stops the purge for space and
#: pauses it (a minute, doubling each time up to ``interval_seconds``): the file system is not
#: giving the space back, or C-STOREs fill it as fast.
INEFFECTIVE = 0.5


@dataclass
class Plan:
    """What a purge would delete now (``purge --dry-run``) and what it keeps past its age."""

    by_age: list[Candidate] = field(default_factory=list)
    for_space: list[Candidate] = field(default_factory=list)
    kept: Kept = field(default_factory=Kept)
    excess: int = 0  # bytes above the purge marks when planned

    @property
    def candidates(self) -> list[Candidate]:
        return self.by_age + self.for_space


class Retention:
    """Runs the policy of ``settings`` over the planner's view with the purger's hands.

    Parameters
    ----------
    settings
        ``[retention]``.
    planner
        Reads what may go.
    purger
        Deletes it (None: plan only, for ``--dry-run``).
    data_dir
        Whose file system the marks are about.
    usage
        Reads the file system's figures (tests inject a fake disk).
    clock
        Seconds since the epoch (tests age data by moving it).
    """

    def __init__(self, settings: RetentionSettings, planner: Planner, purger: Purger | None, data_dir: Path,
                 usage: UsageReader = read_usage, clock: Callable[[], float] = time.time) -> None:
        self.settings, self.planner, self.purger = settings, planner, purger
        self.data_dir, self.usage, self.clock = data_dir, usage, clock
        self.marks = DiskMarks.from_settings(settings)
        self._stuck_logged = False
        self._stuck_until = float("-inf")  # clock() before which a stuck purge for space is not retried
        self._pauses = 0  # batches in a row that freed too little
        # the jobs' backoff (one retry policy): a minute, doubling, up to interval_seconds
        self._pause = QueuePolicy(backoff_seconds=STUCK_RETRY_SECONDS,
                                  max_backoff_seconds=max(STUCK_RETRY_SECONDS, settings.interval_seconds))

    @property
    def enabled(self) -> bool:
        s = self.settings
        return bool(s.inputs_days or s.results_days or self.marks.enabled)

    def purge_by_age(self, report: Callable[[Intent], None] | None = None,
                     stop: threading.Event | None = None) -> Outcome:
        """Delete everything past its age that the rules let go (``stop``: between batches)."""
        outcome = Outcome()
        kept = Kept()
        found = self.planner.by_age(self.clock(), self.settings.inputs_days, self.settings.results_days, kept)
        for batch in batches(found, BATCH):
            outcome.add(self._execute(batch, report))
            if stop is not None and stop.is_set():
                return outcome
        if kept.reasons:
            logger.info("retention: kept past their age: %s", _counts(kept))
        return outcome

    def purge_for_space(self, report: Callable[[Intent], None] | None = None,
                        stop: threading.Event | None = None) -> Outcome:
        """While the disk is above a purge mark, delete the oldest settled data, at most the excess
        first read plus :data:`MARGIN` of it; say so once when nothing more may go (the stop mark
        then protects the disk), and stop when deleting does not free the space."""
        outcome = Outcome()
        usage = self.usage(self.data_dir)
        need = self.marks.excess(usage) if self.marks.enabled else 0
        if not need:
            self._stuck_logged, self._stuck_until, self._pauses = False, float("-inf"), 0
            return outcome
        if self.clock() < self._stuck_until:
            return outcome
        kept = Kept()
        why = self.marks.describe(usage)
        found = self.planner.oldest(why, kept)
        budget = need + int(need * MARGIN)
        while need and not (stop is not None and stop.is_set()):
            if outcome.bytes >= budget:
                logger.warning("retention: %s after deleting %d bytes, the excess first read plus %d%%; "
                               "stopping until the next disk check", why, outcome.bytes, round(100 * MARGIN))
                break
            batch = take_bytes(found, min(need, budget - outcome.bytes), BATCH)
            if not batch:
                self._stuck(why, kept, STUCK_RETRY_SECONDS)
                break
            done = self._execute(batch, report)
            outcome.add(done)
            free_before, usage = usage.free, self.usage(self.data_dir)
            if self._freed_too_little(done.bytes, usage.free - free_before):
                break
            need = self.marks.excess(usage)
        if need == 0:
            self._stuck_logged = False
        return outcome

    def _freed_too_little(self, deleted: int, freed: int) -> bool:
        """Whether deleting ``deleted`` bytes freed too little to go on; if so, pause."""
        if not deleted:
            return False
        if freed >= deleted * INEFFECTIVE:
            self._pauses = 0
            return False
        self._pauses += 1
        pause = self._pause.backoff(self._pauses)
        logger.warning("retention: deleting %d bytes freed %d (file system snapshots, files held open, or "
                       "C-STOREs as fast?); the purge for space pauses for %g s", deleted, max(0, freed),
                       pause)
        self._stuck_until = self.clock() + pause
        return True

    def _stuck(self, why: str, kept: Kept, retry: float) -> None:
        if not self._stuck_logged:
            logger.warning("retention: %s and nothing more may go (%s); C-STOREs are refused once "
                           "the stop mark is reached", why, _counts(kept) or "nothing stored")
            self._stuck_logged = True
        self._stuck_until = self.clock() + retry

    def _execute(self, batch: list[Candidate], report: Callable[[Intent], None] | None) -> Outcome:
        """Check the batch's inputs against the rules again, then delete what may still go: the
        plan read them up to a page of the index earlier, and a job may use them by now."""
        assert self.purger is not None, "a planning-only Retention cannot purge"
        records = [c.instance for c in batch if c.instance is not None]
        free = {f.record.sop_instance_uid for f in self.planner.still_free(records, Kept())}
        ready = [c for c in batch if c.kind != Kind.INPUT or c.sop_instance_uid in free]
        outcome = self.purger.execute(ready) if ready else Outcome()
        outcome.changed += len(batch) - len(ready)
        if report is not None:
            for intent in outcome.done:
                report(intent)
        return outcome

    def plan(self) -> Plan:
        """What :meth:`purge_by_age` then :meth:`purge_for_space` would delete now, deleting nothing
        (the space freed is estimated from the sizes, as the disk cannot be asked)."""
        plan = Plan()
        now = self.clock()
        plan.by_age = list(self.planner.by_age(now, self.settings.inputs_days, self.settings.results_days,
                                               plan.kept))
        if self.marks.enabled:
            usage = self.usage(self.data_dir)
            plan.excess = self.marks.excess(usage)
            need = plan.excess - sum(c.size_bytes for c in plan.by_age)
            if need > 0:
                listed = {(c.kind, c.sop_instance_uid) for c in plan.by_age}
                rest = (c for c in self.planner.oldest(self.marks.describe(usage), Kept())
                        if (c.kind, c.sop_instance_uid) not in listed)
                plan.for_space = take_bytes(rest, need, 10**9)
        return plan

    def run_until(self, stop: threading.Event) -> None:
        """The node's thread: the disk every ``disk_check_seconds``, ages every ``interval_seconds``
        (the first time at once; every ``disk_check_seconds`` if that is longer). Each age round
        first resumes the intents a failed round left (an unlink refused, say), which would
        otherwise wait for the next start. Each step has its own try: one failing never stops
        the others."""
        s = self.settings
        every = max(1, round(s.interval_seconds / s.disk_check_seconds))
        for tick in itertools.count():
            if tick % every == 0:
                if self.purger is not None:
                    _attempt("resuming an interrupted purge", self.purger.resume)
                if s.inputs_days or s.results_days:
                    _attempt("purge by age", partial(self.purge_by_age, stop=stop))
            _attempt("purge for space", partial(self.purge_for_space, stop=stop))
            if stop.wait(s.disk_check_seconds):
                return


def _attempt(what: str, step: Callable[[], object]) -> None:
    try:
        step()
    except Exception:
        logger.exception("retention: %s failed; trying again at the next round", what)


def _counts(kept: Kept) -> str:
    return "; ".join(f"{n} {reason}" for reason, n in sorted(kept.reasons.items()))

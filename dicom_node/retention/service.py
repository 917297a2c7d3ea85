"""The retention policy at work: by age every ``interval_seconds``, by disk space whenever the disk
is above a purge mark (checked every ``disk_check_seconds``), and once from ``dicom-node purge``."""

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.config import RetentionSettings
from dicom_node.retention.disk import DiskMarks, UsageReader, read_usage
from dicom_node.retention.purge import Intent, Outcome, Purger, batches
from dicom_node.retention.rules import Candidate, Kept, Planner, take_bytes

logger = logging.getLogger(__name__)

#: Candidates per batch of intents: each batch is one transaction of intents, then its deletions.
BATCH = 200
#: After a purge for space found nothing more that may go, the node looks again this much later,
#: not at every disk check: each look reads the whole index.
STUCK_RETRY_SECONDS = 60.0


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
        self._stuck_until = float("-inf")  # time.monotonic() before which a stuck purge is not retried

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
        """While the disk is above a purge mark, delete the oldest settled data; say so once when
        nothing more may go (the stop mark then protects the disk)."""
        outcome = Outcome()
        need = self.marks.excess(self.usage(self.data_dir)) if self.marks.enabled else 0
        if not need:
            self._stuck_logged = False
            self._stuck_until = float("-inf")
            return outcome
        if time.monotonic() < self._stuck_until:
            return outcome
        kept = Kept()
        why = self.marks.describe(self.usage(self.data_dir))
        found = self.planner.oldest(why, kept)
        while need and not (stop is not None and stop.is_set()):
            batch = take_bytes(found, need, BATCH)
            if not batch:
                if not self._stuck_logged:
                    logger.warning("retention: %s and nothing more may go (%s); C-STOREs are refused once "
                                   "the stop mark is reached", why, _counts(kept) or "nothing stored")
                    self._stuck_logged = True
                self._stuck_until = time.monotonic() + STUCK_RETRY_SECONDS
                break
            outcome.add(self._execute(batch, report))
            need = self.marks.excess(self.usage(self.data_dir))
        if need == 0:
            self._stuck_logged = False
        return outcome

    def _execute(self, batch: list[Candidate], report: Callable[[Intent], None] | None) -> Outcome:
        assert self.purger is not None, "a planning-only Retention cannot purge"
        outcome = self.purger.execute(batch)
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
        (the first time at once). Each age round first finishes the intents a failed round left
        (an unlink refused, say), which would otherwise wait for the next start."""
        s = self.settings
        every = max(1, round(s.interval_seconds / s.disk_check_seconds))
        for tick in itertools.count():
            try:
                if self.purger is not None and tick % every == 0:
                    self.purger.resume()
                if (s.inputs_days or s.results_days) and tick % every == 0:
                    self.purge_by_age(stop=stop)
                self.purge_for_space(stop=stop)
            except Exception:
                logger.exception("retention purge failed; trying again")
            if stop.wait(s.disk_check_seconds):
                return


def _counts(kept: Kept) -> str:
    return "; ".join(f"{n} {reason}" for reason, n in sorted(kept.reasons.items()))

"""Which stored data may go, and why: the rules of the retention policy, read-only.

An input instance may go when every job that used it (every pipeline, every version, ``not
routed`` records too) has finished and every result those jobs put in the outbox is settled
(delivered, dead or unconfirmed: nothing more is sent without an operator), and when it is older
than ``inputs_days``. An instance no job has used yet stays, whatever its age. A result file may go
when all its outbox records are settled (a result no destination was asked to take has none) and
it is older than ``results_days``. Above a purge mark the ages are waived: settled data goes,
oldest first, until the disk is under the marks again.

The planner reads through the owners' APIs (the store's index, :class:`JobQueue`,
:class:`Outbox`, :class:`ResultArea`), never their tables.
"""

import heapq
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from dicom_node.export.outbox import SETTLED, Outbox, OutboxRecord
from dicom_node.jobs.queue import FINISHED, Job, JobQueue
from dicom_node.store.index import Index, InstanceRecord, SeriesKey
from dicom_node.store.results import ResultArea, ResultFile

DAY = 86400.0
_PAGE = 500
#: Index records read per query: the index has no index on arrival time, so each page is one scan
#: and sort of the table (about 50 ms per 100,000 instances here); large pages keep them few.
_INDEX_PAGE = 5000


class Kind(StrEnum):
    INPUT = "input"
    RESULT = "result"


@dataclass(frozen=True)
class Candidate:
    """One instance or result file the policy lets go, and why (UIDs and figures only)."""

    kind: Kind
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    since: float  # received (input) or written (result), seconds since the epoch
    size_bytes: int
    reason: str
    instance: InstanceRecord | None = None
    result: ResultFile | None = None


@dataclass
class Kept:
    """What the policy keeps although it is past its age, counted by reason (for ``--dry-run``)."""

    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def age_days(now: float, since: float) -> float:
    return max(0.0, now - since) / DAY


class Planner:
    """Lists what may go, oldest first.

    Parameters
    ----------
    index
        The store's index (a read-only one for ``purge --dry-run``).
    jobs, outbox
        The job queue and the outbox; None where the node never created them (nothing was
        processed, nothing was queued).
    results
        The result area; None where it does not exist.
    grace_seconds
        Result files younger than this stay whatever the marks: a running job writes its results
        before it queues them (``jobs.lease_seconds`` in the node).
    clock
        Seconds since the epoch, to compare with the result files' modification times.
    """

    def __init__(self, index: Index, jobs: JobQueue | None, outbox: Outbox | None,
                 results: ResultArea | None, grace_seconds: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.index, self.jobs, self.outbox, self.results = index, jobs, outbox, results
        self.grace_seconds, self.clock = grace_seconds, clock

    def inputs(self, cutoff: float, why: str, kept: Kept) -> Iterator[Candidate]:
        """Input instances received before ``cutoff`` that may go, oldest first; ``why`` starts
        each reason."""
        after = (float("-inf"), "")
        while page := self.index.received_before(cutoff, after, _INDEX_PAGE):
            after = (page[-1].received_at, page[-1].sop_instance_uid)
            for free in self.still_free(page, kept):
                r = free.record
                yield Candidate(Kind.INPUT, r.sop_instance_uid, r.study_instance_uid, r.series_instance_uid,
                                r.received_at, r.size_bytes, f"{why}; {free.jobs} job(s) finished, "
                                f"{free.results} delivery(ies) settled", instance=r)

    def still_free(self, records: Sequence[InstanceRecord], kept: Kept) -> Iterator["Free"]:
        """The ``records`` the rules let go now (read again just before a batch is committed to:
        a job may have come to use them since they were listed); the others counted in ``kept``."""
        keys = {r.series_key for r in records}
        jobs = self._jobs_of(keys)
        unused = {key: self._unlisted(key, jobs[key]) for key in keys}
        deliveries = self._deliveries([j.id for js in jobs.values() for j in js])
        for record in records:
            used = [j for j in jobs[record.series_key] if record.sop_instance_uid in j.instance_uids]
            hold = input_hold(used, deliveries) or _series_hold(unused[record.series_key])
            if hold:
                kept.add(hold)
                continue
            yield Free(record, len(used), sum(len(deliveries.get(j.id, ())) for j in used))

    def _unlisted(self, key: SeriesKey, jobs: Sequence[Job]) -> int:
        """How many instances of the series the index has that no job lists (a late one)."""
        listed = {uid for j in jobs for uid in j.instance_uids}
        return sum(r.sop_instance_uid not in listed for r in self.index.instances(key))

    def _jobs_of(self, series: Iterable[SeriesKey]) -> dict[SeriesKey, Sequence[Job]]:
        if self.jobs is None:
            return {key: () for key in series}
        return {key: self.jobs.of_series(*key) for key in series}

    def _deliveries(self, job_ids: Sequence[int]) -> dict[int, list[OutboxRecord]]:
        return self.outbox.for_jobs(job_ids) if self.outbox is not None and job_ids else {}

    def results_before(self, cutoff: float, why: str, kept: Kept) -> Iterator[Candidate]:
        """Result files written before ``cutoff`` (and longer than the grace ago) whose deliveries
        are all settled and whose jobs are finished, oldest first."""
        if self.results is None:
            return
        young = self.clock() - self.grace_seconds
        found = sorted((f for f in self.results.files() if f.written_at < cutoff), key=lambda f: f.written_at)
        for start in range(0, len(found), _PAGE):
            page = found[start:start + _PAGE]
            records = self.outbox.for_instances([f.sop_instance_uid for f in page]) if self.outbox else {}
            running = self._running({r.job_id for rs in records.values() for r in rs})
            for f in page:
                mine = tuple(records.get(f.sop_instance_uid, ()))
                hold = result_hold(f, mine, running, young)
                if hold:
                    kept.add(hold)
                    continue
                settled = ", ".join(f"{r.state} to {r.destination}" for r in mine) or "no destination"
                yield Candidate(Kind.RESULT, f.sop_instance_uid, f.study_instance_uid, f.series_instance_uid,
                                f.written_at, f.size_bytes, f"{why}; {settled}", result=f)

    def _running(self, job_ids: Iterable[int]) -> dict[int, str]:
        """The state of each of the jobs that is not finished (a re-run rewriting its results)."""
        if self.jobs is None:
            return {}
        jobs = [self.jobs.get(i) for i in sorted(job_ids)]
        return {j.id: str(j.state) for j in jobs if j is not None and j.state not in FINISHED}

    def by_age(self, now: float, inputs_days: float, results_days: float, kept: Kept) -> Iterator[Candidate]:
        """What is past its age (0: kept forever), oldest first."""
        streams = []
        if inputs_days:
            streams.append(self.inputs(now - inputs_days * DAY, f"older than inputs_days {inputs_days:g}",
                                       kept))
        if results_days:
            streams.append(self.results_before(now - results_days * DAY,
                                               f"older than results_days {results_days:g}", kept))
        return heapq.merge(*streams, key=lambda c: c.since)

    def oldest(self, why: str, kept: Kept) -> Iterator[Candidate]:
        """Everything settled, whatever its age, oldest first (above a purge mark)."""
        everything = float("inf")  # a clock stepped back makes no instance too young to go
        return heapq.merge(self.inputs(everything, why, kept), self.results_before(everything, why, kept),
                           key=lambda c: c.since)


def input_hold(used: Sequence[Job], deliveries: dict[int, list[OutboxRecord]]) -> str | None:
    """Why an input used by the jobs ``used`` must stay, or None if it may go."""
    if not used:
        return "input not yet processed (no job has used it)"
    running = [j for j in used if j.state not in FINISHED]
    if running:
        return f"input of a job not finished ({running[0].state})"
    waiting = sorted({r.destination for j in used for r in deliveries.get(j.id, ())
                      if r.state not in SETTLED})
    if waiting:
        return f"input of a result not yet delivered to {', '.join(waiting)}"
    return None


def _series_hold(unlisted: int) -> str | None:
    if unlisted:
        return "input of a series with an instance no job has used yet (the next job version lists it)"
    return None


def result_hold(found: ResultFile, records: Sequence[OutboxRecord], running: dict[int, str],
                young: float) -> str | None:
    """Why a result file must stay, or None if it may go: a delivery not settled, a job named by
    its records not finished, or written after ``young`` (its job may not have queued it yet)."""
    waiting = sorted({r.destination for r in records if r.state not in SETTLED})
    if waiting:
        return f"result not yet delivered to {', '.join(waiting)}"
    busy = [running[r.job_id] for r in records if r.job_id in running]
    if busy:
        return f"result of a job not finished ({busy[0]})"
    if found.written_at >= young:
        return "result written within the grace period (its job may not have queued it yet)"
    return None


@dataclass(frozen=True)
class Free:
    """An input the rules let go, with the figures of its reason."""

    record: InstanceRecord
    jobs: int
    results: int


def take_bytes(candidates: Iterator[Candidate], need: int, limit: int) -> list[Candidate]:
    """The next candidates, up to ``limit`` of them, until their sizes add up to ``need``."""
    batch: list[Candidate] = []
    total = 0
    for candidate in itertools.islice(candidates, limit):
        batch.append(candidate)
        total += candidate.size_bytes
        if total >= need:
            break
    return batch

"""``dicom-node purge [--dry-run]``: the retention policy run once, from the command line.

``--dry-run`` opens the database read-only (it works on a full disk and beside a running node)
and lists what would go. Without it the command takes the data folder's lock, so it never runs
beside a node (which purges by itself), finishes any purge a kill interrupted, then purges.
"""

import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TextIO

from dicom_node.audit import AppendingAudit
from dicom_node.config import Settings
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.export.outbox import Outbox
from dicom_node.jobs.queue import JobQueue
from dicom_node.jobs.sqlite import SQLiteJobBackend
from dicom_node.retention.disk import read_usage, used_percent
from dicom_node.retention.purge import Intent, Outcome, Purger, read_pending
from dicom_node.retention.rules import Candidate, Kind, Planner, age_days
from dicom_node.retention.service import Plan, Retention
from dicom_node.store import InstanceStore
from dicom_node.store.db import DATABASE_NAME, SchemaError
from dicom_node.store.index import Index
from dicom_node.store.results import ResultArea

HEADER = f"{'KIND':<6}  {'AGE (d)':>8}  {'SIZE':>10}  {'SOP INSTANCE UID':<64}  STUDY INSTANCE UID / REASON"


def candidate_line(c: Candidate | Intent, now: float) -> str:
    """One line per deletion: UIDs, age, size and the reason; nothing about the patient."""
    return (f"{c.kind:<6}  {age_days(now, c.since):>8.2f}  {c.size_bytes:>10}  {c.sop_instance_uid:<64}  "
            f"{c.study_instance_uid}\n{'':>94}{c.reason}")


def purge_command(settings: Settings, dry_run: bool, out: TextIO) -> int:
    """Run (or, ``dry_run``, list) one purge of ``settings.node.data_dir``; the exit code."""
    data_dir = settings.node.data_dir
    if not (data_dir / DATABASE_NAME).exists():
        print(f"nothing to purge: {data_dir} has no database yet", file=out)
        return 0
    if dry_run:
        return _dry_run(settings, out)
    return _purge(settings, out)


def _dry_run(settings: Settings, out: TextIO) -> int:
    database = settings.node.data_dir / DATABASE_NAME
    with ExitStack() as stack:
        index = Index(database, read_only=True)
        stack.callback(index.close)
        jobs = _jobs(database)
        if jobs is not None:
            stack.callback(jobs.backend.close)
        outbox = _outbox(database)
        if outbox is not None:
            stack.callback(outbox.close)
        root = settings.node.data_dir / "results"
        results = ResultArea(root) if root.is_dir() else None  # a folder that exists is not written to
        planner = Planner(index, jobs, outbox, results, settings.jobs.lease_seconds)
        retention = Retention(settings.retention, planner, None,
                              settings.node.data_dir)
        plan = retention.plan()
    _print_plan(plan, retention, out)
    interrupted = read_pending(database)
    if interrupted:
        print(f"{len(interrupted)} deletion(s) of an interrupted purge are finished at the next start "
              "or purge", file=out)
    return 0


def _jobs(database: Path) -> JobQueue | None:
    """The job queue read-only; None if the node never created it (nothing was processed)."""
    try:
        return JobQueue(SQLiteJobBackend(database, read_only=True))
    except SchemaError:
        return None


def _outbox(database: Path) -> Outbox | None:
    """The outbox read-only; None if the node never created it (nothing was queued)."""
    try:
        return Outbox(database, read_only=True)
    except SchemaError:
        return None


def _print_plan(plan: Plan, retention: Retention, out: TextIO) -> None:
    now = time.time()
    s = retention.settings
    print(f"retention: inputs_days {s.inputs_days:g}, results_days {s.results_days:g} (0: kept forever); "
          f"disk {used_percent(read_usage(retention.data_dir)):.1f}% used", file=out)
    if plan.candidates:
        print(HEADER, file=out)
    for c in plan.candidates:
        print(candidate_line(c, now), file=out)
    inputs = [c for c in plan.candidates if c.kind == Kind.INPUT]
    total = sum(c.size_bytes for c in plan.candidates)
    print(f"would purge {len(inputs)} input(s) and {len(plan.candidates) - len(inputs)} result(s), "
          f"{total} bytes", file=out)
    if plan.excess > total:
        print(f"still {plan.excess - total} bytes above the purge marks: nothing more may go", file=out)
    for reason, count in sorted(plan.kept.reasons.items()):
        print(f"kept: {count} {reason}", file=out)


def _purge(settings: Settings, out: TextIO) -> int:
    from dicom_node.node import lock_data_dir  # the node's own lock: never purge beside a node

    data_dir = settings.node.data_dir
    database = data_dir / DATABASE_NAME
    try:
        lock = lock_data_dir(data_dir)
    except ConfigError as exc:
        raise DicomNodeError(f"{exc}; the running node purges by itself every retention.interval_seconds "
                             "(use --dry-run to list what would go)") from None
    with ExitStack() as stack:
        stack.callback(os.close, lock)
        audit = AppendingAudit(data_dir / "audit")
        store = InstanceStore(data_dir, audit=audit)
        stack.callback(store.close)
        queue = JobQueue(SQLiteJobBackend(database))
        stack.callback(queue.backend.close)
        outbox = Outbox(database)
        stack.callback(outbox.close)
        results = ResultArea(data_dir / "results")
        purger = Purger(database, store, outbox, results, audit, actor="cli")
        stack.callback(purger.close)
        outcome = purger.resume()
        planner = Planner(store.index, queue, outbox, results, settings.jobs.lease_seconds)
        retention = Retention(settings.retention, planner, purger, data_dir)
        now = time.time()
        print(HEADER, file=out)
        outcome.add(retention.purge_by_age(lambda c: print(candidate_line(c, now), file=out)))
        outcome.add(retention.purge_for_space(lambda c: print(candidate_line(c, now), file=out)))
        _print_outcome(outcome, out)
        if audit.errors:
            raise DicomNodeError(f"done, but {audit.errors} audit event(s) were not written")
        if outcome.failed:
            raise DicomNodeError(f"done, but {outcome.failed} deletion(s) were refused by the file system")
    return 0


def _print_outcome(outcome: Outcome, out: TextIO) -> None:
    print(f"purged {outcome.purged[Kind.INPUT]} input(s) and {outcome.purged[Kind.RESULT]} result(s), "
          f"{outcome.bytes} bytes" + (f"; {outcome.changed} left alone (changed since listed)"
                                      if outcome.changed else ""), file=out)
    if outcome.failed:
        print(f"{outcome.failed} deletion(s) refused by the file system (see the log): tried again at the "
              "next start or purge", file=out)


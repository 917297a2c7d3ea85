"""What became of a job's results, in the words ``jobs list``, ``jobs show`` and the dashboard use.

A job that failed permanently after its instances were collected leaves a "not analysed" SR in
the outbox (``pipeline.report_not_analysed``): the PACS is told. One that failed before that (its
instances gone, no ``sr`` output, the report itself failed) or was given up after retries sent
nothing. The job's record cannot tell the two apart; its outbox records can, so this asks them.
"""

from collections import Counter
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from dicom_node.export.outbox import DeliveryState, OutboxRecord
from dicom_node.jobs.queue import JobState

_FAILED = frozenset({JobState.FAILED, JobState.DEAD})


class JobOutcome(StrEnum):
    """The kinds of outcome; the text shown adds where the results are on their way."""

    ANALYSED = "analysed"
    NOT_ANALYSED_REPORTED = "not analysed, reported"
    FAILED_NOTHING_SENT = "failed, nothing sent"
    UNDECIDED = "-"  # queued, running, not routed


def classify_job(state: str, records: Sequence[OutboxRecord],
                 results: Mapping[str, Any] | None = None) -> JobOutcome:
    """The outcome of a job in ``state`` whose outbox records are ``records``. A job the
    input-distribution gate ended is done but not analysed: its ``results`` say so."""
    abstained = str((results or {}).get("outcome", "")).startswith("not analysed")
    if state in _FAILED or (state == "done" and abstained):
        return JobOutcome.NOT_ANALYSED_REPORTED if records else JobOutcome.FAILED_NOTHING_SENT
    return JobOutcome.ANALYSED if state == "done" else JobOutcome.UNDECIDED


def describe_job(state: str, records: Sequence[OutboxRecord],
                 results: Mapping[str, Any] | None = None) -> str:
    """One phrase for an operator, e.g. "not analysed, reported (1 delivered)" or "failed, nothing sent"."""
    outcome = classify_job(state, records, results)
    if outcome in (JobOutcome.FAILED_NOTHING_SENT, JobOutcome.UNDECIDED):
        return outcome.value
    if not records:
        return f"{outcome.value}, nothing to send"
    return f"{outcome.value} ({delivery_counts(records)})"


def delivery_counts(records: Sequence[OutboxRecord]) -> str:
    """"2 delivered, 1 pending": the records by state, delivered first."""
    counts = Counter(r.state for r in records)
    order = [DeliveryState.DELIVERED, DeliveryState.PENDING, DeliveryState.UNCONFIRMED, DeliveryState.DEAD]
    return ", ".join(f"{counts[s]} {s.value}" for s in order if counts[s])

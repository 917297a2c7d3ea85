"""The outcome operators read for a job: reported or not, analysed or not."""

from dicom_node.export.outbox import DeliveryState, OutboxRecord
from dicom_node.export.outcome import describe_job


def _record(state: DeliveryState) -> OutboxRecord:
    return OutboxRecord(1, "2.25.1", "pacs", "1.2.840.10008.5.1.4.1.1.88.34", "2.25.2", "r.dcm", 7, state,
                        0, 0.0, "", 0.0, 0.0, 0.0)


def test_a_job_the_gate_ended_is_not_analysed_though_done() -> None:
    abstained = {"outcome": "not analysed, reported", "outcome_reason": "outside the validated input"}
    assert describe_job("done", [_record(DeliveryState.DELIVERED)], abstained) == \
        "not analysed, reported (1 delivered)"
    assert describe_job("done", [], abstained) == "failed, nothing sent"
    assert describe_job("done", [_record(DeliveryState.PENDING)], {}) == "analysed (1 pending)"


def test_a_failed_job_is_reported_only_when_its_report_is_in_the_outbox() -> None:
    assert describe_job("failed", [_record(DeliveryState.DEAD)]) == "not analysed, reported (1 dead)"
    assert describe_job("dead", []) == "failed, nothing sent"

"""The audit trail: append-only JSON lines, rotated by size, read back across files in order."""

import json
from pathlib import Path

from dicom_node.audit import AuditTrail, append_event, read_events, study_history


def test_events_are_rotated_by_size_and_read_back_oldest_first(tmp_path: Path) -> None:
    clock = iter(range(1_700_000_000, 1_700_001_000))
    trail = AuditTrail(tmp_path, max_bytes=400, backups=2, clock=lambda: float(next(clock)))
    for i in range(30):
        trail.record("instance_stored", study_instance_uid=f"1.2.{i % 3}", sop_instance_uid=f"1.2.3.{i}")
    trail.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.1.jsonl", "audit.2.jsonl", "audit.jsonl"]  # older ones dropped
    assert all(p.stat().st_size <= 400 for p in tmp_path.iterdir())
    events = list(read_events(tmp_path))
    numbers = [int(e["sop_instance_uid"].rsplit(".", 1)[1]) for e in events]
    assert numbers == sorted(numbers) and numbers[-1] == 29  # the newest kept, in order
    assert events[0]["time"].endswith("Z") and events[0]["event"] == "instance_stored"


def test_a_study_history_survives_a_restart_and_other_processes_append(tmp_path: Path) -> None:
    first = AuditTrail(tmp_path)
    first.record("job_started", study_instance_uid="1.2.1", job=1)
    first.record("job_started", study_instance_uid="9.9", job=2)
    first.close()
    append_event(tmp_path, "operator_requeued_job", actor="cli", study_instance_uid="1.2.1", job=1)
    with (tmp_path / "audit.jsonl").open("a") as fh:
        fh.write('{"event": "cut by a cra')  # a crash in the middle of a line
    again = AuditTrail(tmp_path)
    again.record("job_finished", study_instance_uid="1.2.1", job=1)
    again.close()
    history = study_history(tmp_path, "1.2.1")
    assert [e["event"] for e in history] == ["job_started", "operator_requeued_job", "job_finished"]
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["job"] == 1 and len(lines) == 5  # the cut line stays, alone


def test_a_failing_write_or_rotation_never_raises_and_is_counted(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path, max_bytes=200, backups=1)
    (tmp_path / "audit.1.jsonl").mkdir()  # rotation cannot replace a folder: it must fail
    for i in range(10):
        trail.record("instance_stored", study_instance_uid="1.2", n=i)  # never raises
    assert 1 <= trail.errors < 10  # rotation failed (counted, retried only after another max_bytes)
    assert len(list(read_events(tmp_path))) == 10  # and no event was lost: the file keeps growing
    failed = trail.errors
    trail.close()
    trail.record("job_finished", study_instance_uid="1.2")  # after close: counted, not raised
    assert trail.errors == failed + 1

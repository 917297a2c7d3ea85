"""The node killed with SIGKILL while a job runs: after a restart the job completes exactly once."""

import signal
import sqlite3
import time
from pathlib import Path

from dicom_node.jobs.queue import JobState
from tests.factories import ct_dataset, new_uid
from tests.inference.models import write_model
from tests.ingest.test_scp import send
from tests.nodeproc import NodeProcess

PIPELINE = """
[models]
dir = "../models"
[study]
stable_seconds = 0.5
[workers]
count = 1
poll_seconds = 0.1
shutdown_grace_seconds = 5
[[pipelines]]
name = "ct"
model = "tiny"
match = { modality = ["CT"] }
"""


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        time.sleep(0.05)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def jobs(data_dir: Path) -> list[tuple]:
    with sqlite3.connect(data_dir / "index.sqlite") as conn:
        return conn.execute("SELECT id, state, attempts, series_instance_uid FROM jobs").fetchall()


def test_sigkill_during_a_job_then_restart_runs_it_to_completion_once(tmp_path: Path) -> None:
    record = tmp_path / "runs.txt"
    env = {"FAKE_STEP_RECORD": str(record), "FAKE_STEP_SECONDS": "30"}
    write_model(tmp_path / "models")
    node = NodeProcess(tmp_path / "node", extra_config=PIPELINE, module="tests.fake_node", env=env)
    study, series = new_uid(), new_uid()
    sent = [ct_dataset(study=study, series=series) for _ in range(3)]
    with node:
        assert send(node.port, *sent) == [(0, "")] * 3
        wait_for(lambda: any(line.startswith("start") for line in lines(record)), what="job start")
        node.stop(signal.SIGKILL)
    assert lines(record) == ["start 1 3"]
    assert [(j[1], j[2]) for j in jobs(node.data_dir)] == [(JobState.RUNNING, 1)]

    node.env["FAKE_STEP_SECONDS"] = "0"
    with node.start():
        wait_for(lambda: "done 1 3" in lines(record), what="job completion")
        wait_for(lambda: jobs(node.data_dir)[0][1] == JobState.DONE, what="done state")
        assert node.stop() == 0
    assert lines(record) == ["start 1 3", "start 1 3", "done 1 3"]  # completed exactly once
    assert jobs(node.data_dir) == [(1, JobState.DONE, 2, series)]  # one job, second attempt
    with sqlite3.connect(node.data_dir / "index.sqlite") as conn:
        stored = {row[0] for row in conn.execute("SELECT sop_instance_uid FROM instances")}
    assert stored == {ds.SOPInstanceUID for ds in sent}  # nothing received before the kill lost
    assert "interrupted by the last stop are queued again" in node.log.read_text()

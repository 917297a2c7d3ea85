"""The node as a user runs it: DCMTK's storescu sends a phantom study, the demo model classifies it."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from dicom_node.phantoms import write_study
from tests.jobs.test_crash import wait_for
from tests.nodeproc import REPO, NodeProcess
from tests.peers.test_dcmtk import run_storescu

CONFIG = f"""
[models]
dir = "{REPO / 'models'}"
[study]
stable_seconds = 0.5
[workers]
count = 1
poll_seconds = 0.1
[[pipelines]]
name = "chest"
model = "demo-cxr"
match = {{ modality = ["CR", "DX"], body_part_examined = ["CHEST"] }}
"""


def test_a_phantom_study_sent_by_storescu_is_classified(tmp_path: Path) -> None:
    findings = {"nodule": True, "effusion": True}
    # seeds the demo model reads right (its miss rate is in MODEL_CARD.md; this tests the path)
    paths = write_study(tmp_path / "study", 2, seed=3_000_002, size=1024, modality="DX",
                        findings=findings)
    with NodeProcess(tmp_path / "node", extra_config=CONFIG) as node:
        run_storescu(node.port, ["-R", "+sd"], [tmp_path / "study"])
        database = node.data_dir / "index.sqlite"

        def done() -> bool:
            with sqlite3.connect(database) as conn:
                return conn.execute("SELECT state FROM jobs").fetchall() == [("done",)]

        wait_for(done, timeout=120, what="the job to finish")
        shown = subprocess.run(
            [sys.executable, "-m", "dicom_node", "jobs", "show", "1", "--config", str(node.config)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        assert node.stop() == 0
    with sqlite3.connect(database) as conn:
        (results, timings) = conn.execute("SELECT results, timings FROM jobs").fetchone()
    predictions = json.loads(results)["predictions"]
    assert len(predictions) == len(paths)
    assert all(sorted(p["positives"]) == ["effusion", "nodule"] for p in predictions)
    explained = json.loads(results)["explanations"]
    assert sorted((e["label"], e["method"]) for e in explained) == sorted([("effusion", "gradcam"), ("nodule", "gradcam")] * 2)
    assert set(json.loads(timings)) == {"collect", "read", "decode", "preprocess", "inference", "gate", "explain",
                                        "explain.gradcam", "quality", "encode", "store", "outbox"}
    gate = json.loads(results)["gate"]  # 1024 px phantoms are inside the demo model's validated input
    assert gate["frames_outside"] == 0 and len(gate["frames"]) == len(paths)
    outputs = json.loads(results)["outputs"]  # an overlay per explanation and the series' SR, on disk
    assert len(outputs) == len(explained) + 1
    written = {p.stem for p in (node.data_dir / "results").rglob("*.dcm")}
    assert written == {o["sop_instance_uid"] for o in outputs}
    assert "nodule, effusion" in shown and "time inference" in shown

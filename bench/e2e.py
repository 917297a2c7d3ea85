"""End to end with a real PACS: from the last instance stored at the node to the SR stored at Orthanc.

Orthanc (Debian package, loopback, its own folder) is the destination; the node runs as
``dicom-node serve`` with the demo model; DCMTK's storescu sends phantom CR studies (one 2048 px
image each, a nodule and an effusion) to the node. For each study: the time from the series'
last arrival at the node (its index) until the SR is in Orthanc (polled every 20 ms over REST),
minus ``stable_seconds`` (the wait that makes a series complete). Cases: Grad-CAM; Grad-CAM and
LIME-1000; each with SC overlays and the SR. Then ``--studies`` studies sent at once (Grad-CAM
and LIME): their throughput. ``TCP_NODELAY=1`` for DCMTK and Orthanc.

Usage: ``.venv/bin/python bench/e2e.py [--repeats 3] [--studies 50]``
"""

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom

from dicom_node.phantoms import write_study
from tests.nodeproc import NodeProcess, pacs_config
from tests.orthanc import Orthanc
from tests.peers.test_dcmtk import run_storescu

STABLE = 0.5


def config(pacs_port: int, explain: str) -> str:
    return pacs_config(pacs_port, explain, stable_seconds=STABLE, export="poll_seconds = 1")


def sr_in(pacs: Orthanc, study_uid: str) -> bool:
    query = {"StudyInstanceUID": study_uid, "Modality": "SR"}
    return bool(pacs.post("/tools/find", {"Level": "Series", "Query": query}))


def last_arrival(node: NodeProcess, study_uid: str) -> float:
    with sqlite3.connect(node.data_dir / "index.sqlite") as conn:
        (value,) = conn.execute("SELECT last_received_at FROM studies WHERE study_instance_uid = ?",
                                (study_uid,)).fetchone()
    return float(value)


def study(folder: Path, seed: int) -> tuple[list[Path], str]:
    findings = {"nodule": True, "effusion": True}
    paths = write_study(folder, 1, seed=seed, size=2048, modality="CR", findings=findings)
    return paths, str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def latency(root: Path, explain: str, repeats: int, orthanc: str) -> list[float]:
    node = NodeProcess(root / "node")
    pacs = Orthanc(root / "orthanc", orthanc, {"node": ("XAI_NODE", node.port)})
    node.config.write_text(node.config.read_text() + config(pacs.dicom_port, explain))
    times = []
    with pacs, node:
        for i in range(repeats + 1):  # the first study warms the model up
            paths, uid = study(root / f"study{i}", 9_000_000 + i)
            run_storescu(node.port, [], paths)
            deadline = time.monotonic() + 300
            while not sr_in(pacs, uid):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no SR for study {i} in 300 s; see {node.log}")
                time.sleep(0.02)
            if i:
                times.append(time.time() - last_arrival(node, uid) - STABLE)
    return times


def throughput(root: Path, count: int, orthanc: str) -> tuple[float, float]:
    node = NodeProcess(root / "node")
    pacs = Orthanc(root / "orthanc", orthanc, {"node": ("XAI_NODE", node.port)})
    node.config.write_text(node.config.read_text() + config(pacs.dicom_port, '["gradcam", "lime"]'))
    studies = [study(root / f"s{i}", 9_100_000 + i) for i in range(count)]
    with pacs, node:
        warm, warm_uid = study(root / "warm", 9_099_999)
        run_storescu(node.port, [], warm)
        while not sr_in(pacs, warm_uid):
            time.sleep(0.05)
        started = time.monotonic()
        run_storescu(node.port, [], [p for paths, _ in studies for p in paths])
        pending = {uid for _, uid in studies}
        while pending:
            pending = {uid for uid in pending if not sr_in(pacs, uid)}
            time.sleep(0.2)
        elapsed = time.monotonic() - started
    return elapsed, count / elapsed * 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--studies", type=int, default=50)
    args = parser.parse_args()
    orthanc = shutil.which("Orthanc")
    if orthanc is None:
        print("Orthanc not found: install the Debian package 'orthanc'", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        print("last instance at the node -> SR at Orthanc, minus stable_seconds (s):")
        cases = (("Grad-CAM + SC + SR", '["gradcam"]'),
                 ("Grad-CAM + LIME-1000 + SC + SR", '["gradcam", "lime"]'))
        for k, (name, explain) in enumerate(cases):
            times = latency(root / f"case{k}", explain, args.repeats, orthanc)
            runs = ", ".join(f"{t:.2f}" for t in times)
            print(f"  {name:<32} median {statistics.median(times):.2f}  (runs: {runs})", flush=True)
        if args.studies:
            elapsed, per_minute = throughput(root / "throughput", args.studies, orthanc)
            print(f"{args.studies} studies sent at once (Grad-CAM + LIME): all SRs in Orthanc after "
                  f"{elapsed:.1f} s, {per_minute:.1f} studies/minute")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

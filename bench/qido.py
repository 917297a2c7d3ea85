"""QIDO-RS speed: STUDY-level searches over an index of 100,000 instances.

The index is built as ``bench/query.py`` builds it (its ``build``: ``instance_keys`` records
written by the store's own ``put_keys`` in one transaction, no files): 1,000 patients with 2
studies each, 5 series of 10 instances per study, study dates over two years. Each search is a
whole HTTP request to the DICOMweb sub-application served on loopback by a process of its own
(``tests/dicomweb/serve_process.py``, as a node serves it), timed from the request to the last
byte of the DICOM JSON answer by a ``requests`` session (median of ``--repeats``; the answer is
parsed after the clock stops). The anchor is issue #16's target, 200 ms.

Then, in this process, the parts of the universal search (every study, no limit): its SQL as
the query module ran it before store schema 5 (grouping every record per study; the reference
of ``tests/store/summary_reference.py``) and as it runs now (``study_summary``), and the SQL
with the DICOM JSON writing (what the server does in its thread); medians of ``--repeats``,
alternated, so the machine's load weighs on both alike. ``--save DIR`` writes each answer's
bytes to DIR (to compare two versions' answers).

Usage: ``.venv/bin/python bench/qido.py [--instances 100000] [--repeats 7] [--save DIR]``
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests
from multidict import MultiDict

from bench.query import build
from dicom_node.dicomweb.qido import MAX_RESULTS, _answer, includes
from dicom_node.query.match import find
from dicom_node.store import InstanceStore
from dicom_node.store.keys import Level
from tests.store.summary_reference import GROUPED

TARGET_MS = 200.0


def searches(examples: dict[str, str]) -> dict[str, dict[str, str]]:
    """The STUDY-level searches timed (QIDO-RS query parameters)."""
    return {
        "Patient ID": {"PatientID": examples["PatientID"]},
        "Accession Number": {"AccessionNumber": examples["AccessionNumber"]},
        "Patient's Name wildcard": {"PatientName": examples["PatientName"]},
        "Study Date, one week": {"StudyDate": "20230301-20230307"},
        "Study Date, open range (last month)": {"StudyDate": "20241201-"},
        "Modalities in Study, first page": {"ModalitiesInStudy": "CT", "limit": "100"},
        "every study, first page (limit 100)": {"limit": "100"},
        "every study, page 11 (offset 1000)": {"limit": "100", "offset": "1000"},
        "every study (universal)": {},
        "every study, includefield=all": {"includefield": "all"},
    }


@contextmanager
def served(data_dir: Path) -> Iterator[str]:
    """DICOMweb over ``data_dir`` in a child process; yields its URL."""
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-m", "tests.dicomweb.serve_process", str(data_dir)], cwd=repo,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        assert child.stdout is not None
        yield child.stdout.readline().strip()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)


def in_process(store: InstanceStore, repeats: int) -> None:
    """Time the universal search's SQL before and after schema 5, and its SQL and JSON."""
    found = find({}, level=Level.STUDY, limit=MAX_RESULTS + 1,
                 include=includes(MultiDict(), Level.STUDY, under_study=False))
    index = store.index
    parts = {"SQL grouping every record (before)": lambda: index.find(GROUPED, ()),
             "SQL on study_summary (now)": lambda: index.find(found.sql, found.params),
             "SQL on study_summary + DICOM JSON": lambda: _answer(index, found, "http://x/dicom-web",
                                                                   Level.STUDY, MAX_RESULTS)}
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, part in parts.items():
            begin = time.perf_counter()
            part()
            times[name].append((time.perf_counter() - begin) * 1000)
    for name, values in times.items():
        print(f"in process, universal: {name:36s} median {statistics.median(values):6.1f} ms "
              f"(min {min(values):.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--save", type=Path, help="write each answer's bytes to this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        store = InstanceStore(data_dir)
        start = time.perf_counter()
        examples = build(store, args.instances)
        print(f"index of {args.instances} instances built in {time.perf_counter() - start:.1f} s")
        in_process(store, args.repeats)
        store.close()
        with served(data_dir) as url, requests.Session() as session:
            for name, params in searches(examples).items():
                times = []
                for _ in range(args.repeats):
                    begin = time.perf_counter()
                    answer = session.get(f"{url}/studies", params=params)
                    answer.raise_for_status()
                    times.append((time.perf_counter() - begin) * 1000)
                ms, matches = statistics.median(times), len(answer.json())
                if args.save is not None:
                    args.save.mkdir(parents=True, exist_ok=True)
                    (args.save / f"{name.replace(' ', '_')}.json").write_bytes(answer.content)
                print(f"{name:38s} {matches:5d} studies, {len(answer.content) / 1024:7.0f} KiB: "
                      f"{ms:7.1f} ms = {ms / TARGET_MS:.2f} x the {TARGET_MS:.0f} ms target")


if __name__ == "__main__":
    main()

"""Index write cost per instance: what the store's index adds to each C-STORE.

Writes ``--instances`` instance records into a fresh index, one transaction each as C-STORE does
(:meth:`dicom_node.store.index.Index.put`: the ``instances``, ``series``, ``studies`` and
``instance_keys`` records), in two layouts: one study of that many instances in 10 series (a
large study: the cost of a write must not grow with it), and studies of 50 instances in 5
series. Then it stores every instance of the large study again (a re-store replaces the record)
and removes them all (the retention purge's path). Each is timed twice: with ``synchronous``
NORMAL (the CPU cost; no fsync) and FULL (the node's default), median and mean per instance.

Usage: ``.venv/bin/python bench/index_put.py [--instances 3000] [--synchronous NORMAL]``
"""

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.store.index import Index, InstanceRecord


def records(count: int, per_study: int, tag: str) -> Iterator[tuple[InstanceRecord, dict[str, object]]]:
    """``count`` records, ``per_study`` to a study (10 series per study of 3,000 or more, else 5)."""
    per_series = per_study // (10 if per_study >= 3000 else 5)
    for i in range(count):
        study = f"2.25.{tag}.{i // per_study}"
        series = f"{study}.{i % per_study // per_series}"
        sop = f"{series}.{i}"
        keys: dict[str, object] = {
            "patient_id": f"PID{i // per_study:06d}", "patient_name": "DOE^JOHN",
            "patient_birth_date": "19600101", "patient_sex": "O", "study_date": "20240101",
            "study_time": "101010", "accession_number": "ACC1",
            "study_id": "1", "study_description": "CT CHEST", "referring_physician_name": "",
            "series_number": i % per_study // per_series, "instance_number": i}
        yield InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", series, study, "1.2.840.10008.1.2.1",
                             "CT", "CHEST", "AXIAL", "MODALITY", 1000, f"{study}/{series}/{sop}.dcm",
                             float(i)), keys


def timed(items: list[tuple[InstanceRecord, dict[str, object]]],
          write: Callable[[InstanceRecord, dict[str, object]], object]) -> list[float]:
    """Microseconds per call of ``write`` on each item."""
    times = []
    for record, keys in items:
        start = time.perf_counter()
        write(record, keys)
        times.append((time.perf_counter() - start) * 1e6)
    return times


def report(name: str, times: list[float]) -> None:
    print(f"{name:44s} median {statistics.median(times):7.1f} us, mean {statistics.mean(times):7.1f} us "
          f"({len(times)} instances)")


def run(synchronous: str, count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        index = Index(Path(tmp) / "index.sqlite", synchronous)
        try:
            big = list(records(count, count, "1"))
            report(f"{synchronous}: put, one study of {count}",
                   timed(big, lambda r, k: index.put(r, "M", keys=k)))
            small = list(records(count, 50, "2"))
            report(f"{synchronous}: put, studies of 50", timed(small, lambda r, k: index.put(r, "M", keys=k)))
            report(f"{synchronous}: put again (re-store), one study",
                   timed(big, lambda r, k: index.put(r, "M", keys=k)))
            stored = {r.sop_instance_uid: r for r in index.instances()}
            report(f"{synchronous}: remove, one study",
                   timed(big, lambda r, k: index.remove(stored[r.sop_instance_uid])))
        finally:
            index.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=3000)
    parser.add_argument("--synchronous", choices=("NORMAL", "FULL"), action="append",
                        help="the setting(s) to run with (default: both)")
    args = parser.parse_args()
    for synchronous in args.synchronous or ("NORMAL", "FULL"):
        run(synchronous, args.instances)


if __name__ == "__main__":
    main()

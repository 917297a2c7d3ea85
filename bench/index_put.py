"""Index write cost per instance: what the store's index adds to each C-STORE.

Writes ``--instances`` instance records into a fresh index, one transaction each as C-STORE does
(:meth:`dicom_node.store.index.Index.put`: the ``instances``, ``series``, ``studies`` and
``instance_keys`` records), in two layouts: one study of that many instances in 10 series (a
large study: the cost of a write must not grow with it), and studies of 50 instances in 5
series. Then it stores every instance of the large study again (a re-store replaces the record)
and removes them all (the retention purge's path). Every write goes to two indexes in turn: one
with the study summary (store schema 5) and one without (its triggers dropped: the write as
before), so the machine's load weighs on both alike; each is timed with ``synchronous`` NORMAL
(no fsync) and FULL (the node's default), in this thread's CPU time (user and system: what a
busy machine changes least) and on the wall clock, per instance.

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


Writer = Callable[[Index, InstanceRecord, dict[str, object]], object]


def timed(indexes: tuple[Index, Index], items: list[tuple[InstanceRecord, dict[str, object]]],
          write: Writer) -> list[tuple[list[float], list[float]]]:
    """Microseconds per call of ``write`` on each item, for each index, the two taking turns
    item by item (so a busy machine weighs on both alike): (wall clock, this thread's CPU time,
    user and system) per index."""
    times: list[tuple[list[float], list[float]]] = [([], []), ([], [])]
    for n, (record, keys) in enumerate(items):
        for which in ((0, 1) if n % 2 else (1, 0)):
            start, start_cpu = time.perf_counter(), time.thread_time()
            write(indexes[which], record, keys)
            times[which][1].append((time.thread_time() - start_cpu) * 1e6)
            times[which][0].append((time.perf_counter() - start) * 1e6)
    return times


def report(name: str, times: list[tuple[list[float], list[float]]]) -> None:
    (wall, cpu), (wall_before, cpu_before) = times
    median, median_before = statistics.median(cpu), statistics.median(cpu_before)
    print(f"{name:38s} CPU median {median:6.1f} us against {median_before:6.1f} "
          f"(+{median - median_before:5.1f}); wall median "
          f"{statistics.median(wall):6.1f} against {statistics.median(wall_before):6.1f}, mean "
          f"{statistics.mean(wall):6.1f} against {statistics.mean(wall_before):6.1f}")


def put(index: Index, record: InstanceRecord, keys: dict[str, object]) -> object:
    return index.put(record, "Maker", keys=keys)


def run(synchronous: str, count: int) -> None:
    """Each write on an index with the study summary and on one without (its triggers dropped:
    the index as before schema 5)."""
    with tempfile.TemporaryDirectory() as tmp:
        indexes = (Index(Path(tmp) / "summary.sqlite", synchronous),
                   Index(Path(tmp) / "none.sqlite", synchronous))
        for trigger in ("study_summary_no_replace", "study_summary_insert", "study_summary_delete"):
            indexes[1]._conn.execute(f"DROP TRIGGER {trigger}")
        try:
            big = list(records(count, count, "1"))
            report(f"{synchronous}: put, one study of {count}", timed(indexes, big, put))
            report(f"{synchronous}: put, studies of 50", timed(indexes, list(records(count, 50, "2")), put))
            report(f"{synchronous}: put again (re-store), one study", timed(indexes, big, put))
            stored = [{r.sop_instance_uid: r for r in index.instances()} for index in indexes]

            def remove(index: Index, record: InstanceRecord, keys: dict[str, object]) -> object:
                return index.remove(stored[indexes.index(index)][record.sop_instance_uid])

            report(f"{synchronous}: remove, one study", timed(indexes, big, remove))
        finally:
            for index in indexes:
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

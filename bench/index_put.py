"""Index write cost per instance: what the store's index adds to each C-STORE.

Writes ``--instances`` instance records into a fresh index, one transaction each as C-STORE does
(:meth:`dicom_node.store.index.Index.put`: the ``instances``, ``series``, ``studies`` and
``instance_keys`` records), in four layouts, each timed for its puts, then for storing every
instance again (a re-store deletes the record and inserts it), then for removing them all
(:meth:`~dicom_node.store.index.Index.remove`, the retention purge's path):

- ``uniform``: one study of that many instances in 10 series whose records agree (a large
  study: the cost of a write must not grow with it);
- ``disagree``: the same study, but its records disagree: every other one has the greater
  Study Description, the others the greater Study Time (several devices in one study); its
  re-store makes the description grow at each record and the greater time shrink (they still
  disagree: the last record holds the greatest description, every other one the greatest time);
- ``series``: one study of that many single-instance series (as US, XA, DX and CR studies
  often are); re-stored as they were;
- ``studies``: studies of 50 instances in 5 series (puts only).

Every write goes to two indexes in turn: one with the study summary (store schema 6) and one
without (its triggers dropped: the write as before the summary, except that
:func:`~dicom_node.store.keyindex.put_keys` deletes then inserts in both, where before schema 5
it ran one ``INSERT OR REPLACE``), so the machine's load weighs on both alike; each is timed
with ``synchronous`` NORMAL (no fsync) and FULL (the node's default), in this thread's CPU time
(user and system: what a busy machine changes least) and on the wall clock, per instance; the
mean of the last 100 puts shows a cost that grows with the study.

Usage: ``.venv/bin/python bench/index_put.py [--instances 3000] [--synchronous NORMAL]
[--layout disagree]``
"""

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.store import summary
from dicom_node.store.index import Index, InstanceRecord

Item = tuple[InstanceRecord, dict[str, object]]
LAYOUTS = ("uniform", "disagree", "series", "studies")


def records(count: int, layout: str, again: bool = False) -> Iterator[Item]:
    """``count`` records in ``layout``; ``again``: the values of a re-store."""
    per_study = 50 if layout == "studies" else count
    per_series = 1 if layout == "series" else per_study // (5 if layout == "studies" else 10)
    for i in range(count):
        study = f"2.25.{LAYOUTS.index(layout)}.{i // per_study}"
        series = f"{study}.{i % per_study // per_series}"
        sop = f"{series}.{i}"
        keys: dict[str, object] = {
            "patient_id": f"PID{i // per_study:06d}", "patient_name": "DOE^JOHN",
            "patient_birth_date": "19600101", "patient_sex": "O", "study_date": "20240101",
            "study_time": "101010", "accession_number": "ACC1",
            "study_id": "1", "study_description": "CT CHEST", "referring_physician_name": "",
            "series_number": i % per_study // per_series, "instance_number": i}
        if layout == "disagree":
            keys.update(study_description="CT CHEST" if i % 2 else "CT CHEST W",
                        study_time="101011" if i % 2 else "101010")
            if again:  # the description grows at each record; the greatest time shrinks
                keys.update(study_description=f"CT CHEST X{i:06d}",
                            study_time="090000" if i % 2 else "101010")
        yield InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", series, study, "1.2.840.10008.1.2.1",
                             "CT", "CHEST", "AXIAL", "MODALITY", 1000, f"{study}/{series}/{sop}.dcm",
                             float(i)), keys


Writer = Callable[[Index, InstanceRecord, dict[str, object]], object]
Times = list[tuple[list[float], list[float]]]


def timed(indexes: tuple[Index, Index], items: list[Item], write: Writer) -> Times:
    """Microseconds per call of ``write`` on each item, for each index, the two taking turns
    item by item (so a busy machine weighs on both alike): (wall clock, this thread's CPU time,
    user and system) per index."""
    times: Times = [([], []), ([], [])]
    for n, (record, keys) in enumerate(items):
        for which in ((0, 1) if n % 2 else (1, 0)):
            start, start_cpu = time.perf_counter(), time.thread_time()
            write(indexes[which], record, keys)
            times[which][1].append((time.thread_time() - start_cpu) * 1e6)
            times[which][0].append((time.perf_counter() - start) * 1e6)
    return times


def report(name: str, times: Times) -> None:
    (wall, cpu), (wall_before, cpu_before) = times
    median, median_before = statistics.median(cpu), statistics.median(cpu_before)
    print(f"{name:40s} CPU median {median:6.1f} us against {median_before:6.1f} "
          f"(+{median - median_before:5.1f}), mean {statistics.mean(cpu):6.1f} against "
          f"{statistics.mean(cpu_before):6.1f}, last 100 {statistics.mean(cpu[-100:]):6.1f} against "
          f"{statistics.mean(cpu_before[-100:]):6.1f}; wall median {statistics.median(wall):6.1f} against "
          f"{statistics.median(wall_before):6.1f}, mean {statistics.mean(wall):6.1f} against "
          f"{statistics.mean(wall_before):6.1f}", flush=True)


def put(index: Index, record: InstanceRecord, keys: dict[str, object]) -> object:
    return index.put(record, "Maker", keys=keys)


def remover(indexes: tuple[Index, Index]) -> Writer:
    """Remove an item's record as the index holds it now (the purge removes what it read)."""
    stored = [{r.sop_instance_uid: r for r in index.instances()} for index in indexes]

    def remove(index: Index, record: InstanceRecord, keys: dict[str, object]) -> object:
        return index.remove(stored[indexes.index(index)][record.sop_instance_uid])

    return remove


def run(synchronous: str, count: int, layouts: list[str]) -> None:
    """Each write on an index with the study summary and on one without (its triggers dropped:
    the index as before the summary)."""
    with tempfile.TemporaryDirectory() as tmp:
        indexes = (Index(Path(tmp) / "summary.sqlite", synchronous),
                   Index(Path(tmp) / "none.sqlite", synchronous))
        for trigger in summary.TRIGGERS:
            indexes[1]._conn.execute(f"DROP TRIGGER {trigger}")
        try:
            for layout in layouts:
                items = list(records(count, layout))
                report(f"{synchronous} {layout}: put", timed(indexes, items, put))
                if layout == "studies":
                    continue
                report(f"{synchronous} {layout}: put again (re-store)",
                       timed(indexes, list(records(count, layout, again=True)), put))
                report(f"{synchronous} {layout}: remove", timed(indexes, items, remover(indexes)))
        finally:
            for index in indexes:
                index.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=3000)
    parser.add_argument("--synchronous", choices=("NORMAL", "FULL"), action="append",
                        help="the setting(s) to run with (default: both)")
    parser.add_argument("--layout", choices=LAYOUTS, action="append", help="the layout(s) (default: all)")
    args = parser.parse_args()
    for synchronous in args.synchronous or ("NORMAL", "FULL"):
        run(synchronous, args.instances, args.layout or list(LAYOUTS))


if __name__ == "__main__":
    main()

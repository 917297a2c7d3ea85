"""``study_summary``'s triggers do a bounded amount of work per write, whatever the study's size:
counted in SQLite virtual machine instructions (a progress handler called at each one), which
depend on the data and the statements only, not on the machine's speed or load. A trigger that
read the whole study at each write (a holder count that stays 0 when records disagree, the
series count or modalities recomputed from every series) costs ten times as much per write in a
study ten times as large."""

import sqlite3
import statistics
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from dicom_node.store.index import Index, InstanceRecord
from tests.store.summary_reference import grouped, summarised, wrong_holders


def record(study: str, series: str, sop: str, at: float) -> InstanceRecord:
    return InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", series, study, "1.2.840.10008.1.2.1", "CT",
                          "CHEST", "AXIAL", "MODALITY", 100, f"{study}/{series}/{sop}.dcm", at)


def instructions(conn: sqlite3.Connection, write: Callable[[], object]) -> int:
    """The virtual machine instructions SQLite runs for ``write`` (its statements and triggers)."""
    count = 0

    def counted() -> int:
        nonlocal count
        count += 1
        return 0  # go on

    conn.set_progress_handler(counted, 1)
    try:
        write()
    finally:
        conn.set_progress_handler(None, 1)
    return count


def put(index: Index, at: float, study: str, series: str, sop: str, **values: str) -> int:
    keys = {"study_instance_uid": study, "series_instance_uid": series, "sop_instance_uid": sop,
            "modality": "CT", "patient_id": "PID1", "patient_name": "DOE^JOHN", **values}
    return instructions(index._conn, lambda: index.put(record(study, series, sop, at), "Maker", keys=keys))


def removals(index: Index, study: str) -> Iterator[int]:
    """Remove the study's records in order of receipt (the retention purge's order): the
    instructions of each."""
    for stored in index.instances():
        if stored.study_instance_uid == study:
            yield instructions(index._conn, partial(index.remove, stored))


def costs(index: Index, size: int) -> dict[str, float]:
    """Mean instructions per write in a study of ``size`` single-instance series whose records
    disagree (every other record has the greater description, the others the greater time), then
    per re-store of each with one value growing and another shrinking, then per removal."""
    study = f"2.25.{size}"
    sops = [(f"{study}.{n}", f"{study}.{n}.1") for n in range(size)]
    puts = [put(index, n, study, series, sop, study_description="B" if n % 2 else "A",
                study_time="100000" if n % 2 else "120000") for n, (series, sop) in enumerate(sops)]
    restores = [put(index, size + n, study, series, sop, study_description=f"C{n:05d}", study_time="090000")
                for n, (series, sop) in enumerate(sops)]
    assert summarised(index._conn) == grouped(index._conn) and wrong_holders(index._conn) == []
    removed = list(removals(index, study))
    assert len(removed) == size and summarised(index._conn) == []
    return {"put": statistics.mean(puts), "re-store": statistics.mean(restores),
            "remove": statistics.mean(removed)}


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    index = Index(tmp_path / "index.sqlite", "NORMAL")
    yield index
    index.close()


def test_a_write_costs_the_same_in_a_study_ten_times_as_large(index: Index) -> None:
    small, large = costs(index, 80), costs(index, 800)
    for write, cost in small.items():
        assert large[write] < 1.2 * cost, (write, small, large)


def test_a_delete_reads_the_study_again_only_when_a_greatest_value_s_last_holder_leaves(index: Index) -> None:
    """Of 600 records, the first 100 hold the greatest description and the next 100 the greatest
    time: removed in order, the 100th and the 200th removals read the study again, no other."""
    study = "2.25.1"
    for n in range(600):
        put(index, n, study, f"{study}.{n % 7}", f"{study}.{n % 7}.{n}", study_description="B" if n < 100 else "A",
            study_time="120000" if 100 <= n < 200 else "100000")
    removed = list(removals(index, study))
    usual = statistics.median(removed)
    assert [n for n, cost in enumerate(removed) if cost > 3 * usual] == [99, 199]

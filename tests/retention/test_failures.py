"""What goes wrong around a purge: a deletion the file system refuses,
a batch interrupted before it reached some of its entries, free space that does not come back."""

import errno
import logging
import threading
import time
from pathlib import Path

import pytest

from dicom_node.config import RetentionSettings
from dicom_node.export.outbox import DeliveryState
from dicom_node.jobs.queue import JobState
from dicom_node.retention import PURGED, DiskUsage, Kind
from dicom_node.store import InstanceRecord
from tests.retention.world import DAY, World


class Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs."""


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path / "data")
    yield w
    w.close()


def delivered(world: World, count: int) -> list[InstanceRecord]:
    """``count`` instances of one series whose job is done and whose result was delivered, aged
    40 days."""
    records = world.series(count)
    world.result(world.job(records, JobState.DONE), DeliveryState.DELIVERED)
    world.clock.now += 40 * DAY
    return records


def refuse(world: World, refused: set[str], error: type[BaseException] | None = None) -> None:
    """Make the store's unlink of the files ``refused`` (paths below instances/) fail with EACCES
    (or raise ``error``); ``refused`` may be emptied later."""
    unlink = world.store.files.unlink

    def failing(relative: Path) -> None:
        if str(relative) in refused:
            if error is not None:
                raise error
            raise PermissionError(errno.EACCES, "Permission denied")
        unlink(relative)

    world.store.files.unlink = failing  # type: ignore[method-assign]


def indexed(world: World) -> set[str]:
    return {r.sop_instance_uid for r in world.store.index.instances()}


def test_a_refused_deletion_keeps_its_intent_and_stops_neither_the_others_nor_resume(world: World) -> None:
    records = delivered(world, 3)
    refused = {records[0].path}
    refuse(world, refused)
    outcome = world.retention(RetentionSettings(inputs_days=30)).purge_by_age()
    assert outcome.purged[Kind.INPUT] == 2 and outcome.failed == 1  # the batch went on past it
    [intent] = world.purger.pending()
    assert intent.sop_instance_uid == records[0].sop_instance_uid
    assert world.store.path_of(records[0]).is_file() and indexed(world) == set()

    again = world.purger.resume()  # still refused: counted, kept, not raised
    assert again.failed == 1 and world.purger.pending() == [intent]
    refused.clear()  # the operator fixed the permissions
    done = world.purger.resume()
    assert done.purged[Kind.INPUT] == 1 and world.purger.pending() == []
    assert not world.store.path_of(records[0]).exists()
    [event] = [e for e in world.audit.named(PURGED) if e["sop_instance_uid"] == records[0].sop_instance_uid]
    assert event["resumed"]


def test_resume_finishes_only_what_was_begun_and_leaves_the_rest_to_the_rules(world: World) -> None:
    records = delivered(world, 3)
    first, untouched, power_cut = sorted(records, key=lambda r: r.sop_instance_uid)
    refused = {first.path}
    refuse(world, refused, Killed)  # killed after the first index deletion, before its unlink
    candidates = world.retention(RetentionSettings(inputs_days=30)).plan().by_age
    ordered = sorted(candidates, key=lambda c: c.sop_instance_uid)
    with pytest.raises(Killed):
        world.purger.execute(ordered)
    assert indexed(world) == {untouched.sop_instance_uid, power_cut.sop_instance_uid}
    # a power cut lost the index deletion of the third, but its unlink had reached the disk
    world.store.path_of(power_cut).unlink()
    # meanwhile a late instance made a new job version that uses the untouched one: it must stay
    v2 = world.job([untouched, power_cut], JobState.QUEUED)
    refused.clear()  # the next start

    outcome = world.purger.resume()
    assert world.purger.pending() == []
    assert outcome.replanned == 1 and outcome.purged[Kind.INPUT] == 2
    assert not world.store.path_of(first).exists()  # the stray file of the begun deletion
    assert indexed(world) == {untouched.sop_instance_uid}  # the record naming a missing file went
    assert world.store.path_of(untouched).is_file()
    assert world.queue.get(v2.id) is not None


def test_the_node_round_resumes_in_its_own_try(world: World) -> None:
    delivered(world, 2)
    calls = []

    def broken() -> None:
        calls.append(1)
        raise OSError(errno.EIO, "Input/output error")

    world.purger.resume = broken  # type: ignore[method-assign]
    policy = world.retention(RetentionSettings(inputs_days=30, interval_seconds=0.05, disk_check_seconds=0.05))
    stop = threading.Event()
    thread = threading.Thread(target=policy.run_until, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while indexed(world):
            assert time.monotonic() < deadline, "a failing resume stopped the purge by age"
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert calls and not thread.is_alive()


class Ticks(threading.Event):
    """A stop event whose waits return at once, set after ``count`` of them."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def wait(self, timeout: float | None = None) -> bool:
        self.count -= 1
        if self.count <= 0:
            self.set()
        return self.is_set()


@pytest.mark.parametrize(("interval", "disk", "ages"), [(40.0, 10.0, 3), (5.0, 10.0, 9)])
def test_ages_and_resume_run_every_interval_the_disk_every_check(world: World, interval: float, disk: float,
                                                                 ages: int) -> None:
    policy = world.retention(RetentionSettings(inputs_days=30, interval_seconds=interval,
                                               disk_check_seconds=disk))
    calls = {"resume": 0, "age": 0, "space": 0}

    def counting(name: str):
        def call(*args: object, **kwargs: object) -> None:
            calls[name] += 1
        return call

    world.purger.resume = counting("resume")  # type: ignore[method-assign]
    policy.purge_by_age = counting("age")  # type: ignore[method-assign]
    policy.purge_for_space = counting("space")  # type: ignore[method-assign]
    policy.run_until(Ticks(9))  # ticks 0..8
    # interval 40 s, disk 10 s: ages at ticks 0, 4, 8; an interval shorter than the check: every tick
    assert calls == {"resume": ages, "age": ages, "space": 9}


def files_size(world: World) -> int:
    return sum(p.stat().st_size for p in (world.data_dir / "instances").rglob("*.dcm"))


def test_a_purge_for_space_that_frees_nothing_stops_after_one_batch(world: World,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    records = delivered(world, 10)
    one = records[0].size_bytes
    # snapshots: the figures never move; the excess is 3 instances (their sizes differ by a few bytes)
    stuck = DiskUsage(total=100 * one, used=83 * one - 50, free=17 * one + 50)
    policy = world.retention(RetentionSettings(purge_above_percent=80), usage=lambda _: stuck)
    outcome = policy.purge_for_space()
    assert outcome.purged[Kind.INPUT] == 3  # the excess, 3 instances, then it saw nothing freed
    assert len(indexed(world)) == 7
    assert any("freed 0" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert policy.purge_for_space().purged[Kind.INPUT] == 0  # paused for a minute
    world.clock.now += 61
    assert policy.purge_for_space().purged[Kind.INPUT] == 3  # then one batch again, not everything
    world.clock.now += 61
    assert policy.purge_for_space().purged[Kind.INPUT] == 0  # the pause doubled: two minutes
    world.clock.now += 60
    assert policy.purge_for_space().purged[Kind.INPUT] == 3 and len(indexed(world)) == 1


def test_a_purge_for_space_deletes_at_most_the_first_excess_and_a_margin(world: World,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    records = delivered(world, 10)
    one, start = records[0].size_bytes, files_size(world)

    def slow(_: Path) -> DiskUsage:
        # each deleted byte gives back 0.6 of a byte (something else fills the disk meanwhile)
        free = 17 * one + 50 + int(0.6 * (start - files_size(world)))
        return DiskUsage(100 * one, 100 * one - free, free)

    policy = world.retention(RetentionSettings(purge_above_percent=80), usage=slow)
    outcome = policy.purge_for_space()
    assert outcome.bytes <= 3 * one * 1.1 + one  # the excess read first (3), the margin, one more at most
    # 3 freed 1.8, the budget's last 0.3 took one more; without the cap it would go on to 5
    assert outcome.purged[Kind.INPUT] == 4 and len(indexed(world)) == 6
    assert any("the excess first read" in r.getMessage() for r in caplog.records)


def test_a_deletion_audited_before_its_intent_failed_to_go_is_not_audited_again(world: World) -> None:
    import sqlite3

    from dicom_node.web import Metrics

    [record] = delivered(world, 1)
    metrics = Metrics()
    world.purger.audit = world.audit  # the node's Fanout: the audit trail and the metrics
    real_record = world.audit.record

    def both(event: str, **fields: object) -> None:
        real_record(event, **fields)
        metrics.record(event, **fields)

    world.audit.record = both  # type: ignore[method-assign]
    forget = world.purger._forget
    fails = [sqlite3.OperationalError("database is locked")]

    def failing(intent: object) -> None:
        if fails:
            raise fails.pop()
        forget(intent)  # type: ignore[arg-type]

    world.purger._forget = failing  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError):
        world.retention(RetentionSettings(inputs_days=30)).purge_by_age()
    assert len(world.purger.pending()) == 1  # deleted and audited, its intent still there
    outcome = world.purger.resume()  # the next round, in the same process
    assert world.purger.pending() == [] and outcome.purged[Kind.INPUT] == 0
    assert [e["sop_instance_uid"] for e in world.audit.named(PURGED)] == [record.sop_instance_uid]
    assert metrics.sample("dicom_node_purged_total", kind="input") == 1
    assert metrics.sample("dicom_node_purged_bytes_total", kind="input") == record.size_bytes


def test_resume_of_result_intents(world: World) -> None:
    paths = []
    for _ in range(3):
        records = world.series(1)
        paths.append(world.result(world.job(records, JobState.DONE), DeliveryState.DELIVERED))
    world.clock.now += 40 * DAY
    results = sorted((c for c in world.retention(RetentionSettings(results_days=30)).plan().by_age
                      if c.kind == Kind.RESULT), key=lambda c: str(c.result.path if c.result else ""))
    gone, kept, untouched = sorted(paths)

    def killed(found: object) -> bool:
        raise Killed  # after the outbox records were forgotten, before the file

    world.store.remove_result = killed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        world.purger.execute(results)
    gone.unlink()  # this one's unlink had reached the disk when the kill came
    # and say the second's outbox records had been forgotten too, its file not yet removed
    assert world.outbox.forget(world.outbox.for_instances([kept.stem])[kept.stem])
    del world.store.remove_result  # the next start
    outcome = world.purger.resume()
    # the first: records and file gone, so it was done: audited now; the second: its file is
    # still there without records, left to the next plan; the third: untouched, its records stay
    assert outcome.purged[Kind.RESULT] == 1 and outcome.replanned == 2 and world.purger.pending() == []
    assert [e["sop_instance_uid"] for e in world.audit.named(PURGED)] == [gone.stem]
    assert kept.is_file() and untouched.is_file() and len(world.outbox.list()) == 1
    assert world.retention(RetentionSettings(results_days=30)).purge_by_age().purged[Kind.RESULT] == 2
    assert not kept.exists() and not untouched.exists() and world.outbox.list() == []

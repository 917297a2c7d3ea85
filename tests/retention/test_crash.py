"""A purge killed anywhere leaves the index, the files and the outbox consistent, and the next
start finishes it: no index record names a missing file, no file is left that the index lacks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicom_node.audit import read_events
from dicom_node.config import RetentionSettings
from dicom_node.export.outbox import DeliveryState
from dicom_node.jobs.queue import JobState
from dicom_node.retention import PURGED, Kind
from dicom_node.retention.purge import read_pending
from dicom_node.store.db import DATABASE_NAME
from dicom_node.store.index import Index
from tests.nodeproc import REPO, NodeProcess
from tests.retention.world import DAY, Clock, World


class Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs, no cleanup."""


def on_disk(data_dir: Path) -> set[str]:
    return {str(p.relative_to(data_dir / "instances")) for p in (data_dir / "instances").rglob("*.dcm")}


def check_consistent(data_dir: Path) -> set[str]:
    """Every index record's file exists; returns the files the index lacks."""
    index = Index(data_dir / DATABASE_NAME, read_only=True)
    try:
        paths = {path for path, _ in index.paths()}
    finally:
        index.close()
    files = on_disk(data_dir)
    assert paths <= files, f"records without files: {sorted(paths - files)[:3]}"
    return files - paths


def test_a_purge_killed_between_index_and_file_is_finished_at_the_next_start(tmp_path: Path) -> None:
    world = World(tmp_path / "data")
    old = [r for _ in range(3) for r in world.series(4)]
    for i in range(0, 12, 4):
        job = world.job(old[i:i + 4], JobState.DONE)
        world.result(job, DeliveryState.DELIVERED)
    world.clock.now += 40 * DAY
    calls = 0
    unlink = world.store.files.unlink

    def dying_unlink(relative: Path) -> None:
        nonlocal calls
        calls += 1
        if calls == 6:
            raise Killed  # the index record is gone, the file is still there
        unlink(relative)

    world.store.files.unlink = dying_unlink  # type: ignore[method-assign]
    with pytest.raises(Killed):
        world.retention(RetentionSettings(inputs_days=30, results_days=30)).purge_by_age()
    stray = check_consistent(world.data_dir)
    assert len(stray) == 1  # the file the kill left behind, named by an intent
    assert {i.path for i in world.purger.pending()} >= stray
    world.close()

    again = World(tmp_path / "data", Clock(world.clock.now))
    outcome = again.purger.resume()  # what Node.start does, in this order
    again.store.recover()
    assert check_consistent(again.data_dir) == set()
    assert again.purger.pending() == []
    # only the 6th was begun (its record gone, its stray file left): it is finished, and recover()
    # did not index its file again; the 6 inputs and 3 results nothing was deleted of are left to
    # the next plan, which checks the rules again (a job may have come to use them)
    assert outcome.purged[Kind.INPUT] == 1 and outcome.replanned == 9
    assert len(again.store.index.instances()) == 6
    before = {e["sop_instance_uid"] for e in world.audit.named(PURGED) if e["kind"] == Kind.INPUT}
    resumed = {e["sop_instance_uid"] for e in again.audit.named(PURGED) if e["kind"] == Kind.INPUT}
    assert len(before) == 5 and len(resumed) == 1  # each deletion audited once here
    assert all(e["resumed"] for e in again.audit.named(PURGED))
    assert len(list(again.results.root.rglob("*.dcm"))) == 3 and len(again.outbox.list()) == 3
    # the next age round takes the rest, results with their outbox records
    again.retention(RetentionSettings(inputs_days=30, results_days=30)).purge_by_age()
    assert again.store.index.instances() == [] and check_consistent(again.data_dir) == set()
    every = {e["sop_instance_uid"] for e in world.audit.named(PURGED) + again.audit.named(PURGED)
             if e["kind"] == Kind.INPUT}
    assert every == {r.sop_instance_uid for r in old}
    assert list(again.results.root.rglob("*.dcm")) == [] and again.outbox.list() == []
    again.close()


def _build(data_dir: Path, series: int, per_series: int) -> list[str]:
    world = World(data_dir, Clock(time.time() - 10 * DAY))
    uids = []
    for _ in range(series):
        records = world.series(per_series)
        world.result(world.job(records, JobState.DONE), DeliveryState.DELIVERED)
        uids += [r.sop_instance_uid for r in records]
    world.close()
    return uids


def _purged(data_dir: Path) -> list[str]:
    return [e["sop_instance_uid"] for e in read_events(data_dir / "audit")
            if e["event"] == PURGED and e["kind"] == "input"]


def _purge_cli(config: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    return subprocess.Popen([sys.executable, "-m", "dicom_node", "purge", "--config", str(config),
                             "--set", "retention.inputs_days=1", "--set", "retention.results_days=1"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_mid_purge_leaves_nothing_dangling_and_the_node_finishes_it(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node")  # retention off in its config: only resume() may delete
    uids = _build(node.data_dir, series=20, per_series=25)
    proc = _purge_cli(node.config)
    deadline = time.monotonic() + 60
    while len(_purged(node.data_dir)) < 100:
        assert proc.poll() is None, f"purge ended before the kill: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    if proc.stderr:
        proc.stderr.close()
    stray = check_consistent(node.data_dir)  # no record names a missing file, even now
    killed_at = set(_purged(node.data_dir))
    assert 100 <= len(killed_at) < len(uids)
    index = Index(node.data_dir / DATABASE_NAME, read_only=True)
    indexed = {uid for _, uid in index.paths()}
    index.close()
    assert not killed_at & indexed
    interrupted = read_pending(node.data_dir / DATABASE_NAME)
    assert interrupted and stray <= {i.path for i in interrupted}  # the batch in hand, committed to

    with node:  # a restart with retention off: only the interrupted purge's intents are finished
        pass
    assert check_consistent(node.data_dir) == set()  # no stray file is left, none was re-indexed
    index = Index(node.data_dir / DATABASE_NAME, read_only=True)
    after = {uid for _, uid in index.paths()}
    index.close()
    finished = set(_purged(node.data_dir))
    assert read_pending(node.data_dir / DATABASE_NAME) == []
    begun = {i.sop_instance_uid for i in interrupted if i.kind == Kind.INPUT and i.sop_instance_uid not in indexed}
    assert after == set(uids) - finished and finished == killed_at | begun  # the rest: to the next plan
    print(f"killed after {len(killed_at)} of {len(uids)} deletions, {len(stray)} stray file(s); "
          f"the restart finished {len(finished) - len(killed_at)}")

    rerun = _purge_cli(node.config)  # and a purge run afterwards takes the rest
    assert rerun.wait(timeout=120) == 0, rerun.stderr.read() if rerun.stderr else ""
    if rerun.stderr:
        rerun.stderr.close()
    assert check_consistent(node.data_dir) == set() and on_disk(node.data_dir) == set()
    assert sorted(set(_purged(node.data_dir))) == sorted(uids)
    assert list((node.data_dir / "results").rglob("*.dcm")) == []


def test_a_running_node_purges_by_itself(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", extra_config="[retention]\ninputs_days = 1\nresults_days = 1\n")
    uids = _build(node.data_dir, series=2, per_series=3)
    made = set((node.data_dir / "results").rglob("*.dcm"))
    with node:
        deadline = time.monotonic() + 60
        while set(_purged(node.data_dir)) != set(uids) or any(p.exists() for p in made):
            assert time.monotonic() < deadline, "the node did not purge within 60 s"
            time.sleep(0.1)
    assert check_consistent(node.data_dir) == set() and on_disk(node.data_dir) == set()
    # the old results went; the node's scheduler may have run the series again meanwhile (its
    # "not analysed" report is new: within the grace or not yet delivered, it stays)
    assert len(made) == 2 and not made & set((node.data_dir / "results").rglob("*.dcm"))
    assert {e["actor"] for e in read_events(node.data_dir / "audit") if e["event"] == PURGED} == {"node"}

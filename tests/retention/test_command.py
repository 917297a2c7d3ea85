"""``dicom-node purge [--dry-run]``, the node's periodic purge and the ``[retention]`` settings."""

import threading
import time
from pathlib import Path

import pytest

from dicom_node.audit import read_events
from dicom_node.cli import main
from dicom_node.config import RetentionSettings, load_settings
from dicom_node.errors import ConfigError
from dicom_node.export.outbox import DeliveryState
from dicom_node.jobs.queue import JobState
from dicom_node.node import lock_data_dir
from dicom_node.retention.service import STUCK_RETRY_SECONDS
from tests.retention.world import DAY, Clock, World

CONFIG = """
[node]
data_dir = "data"
[store]
min_free_space = 0
[retention]
inputs_days = 30
results_days = 30
"""


@pytest.fixture(autouse=True)
def keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """``main`` would point the root logger at this test's captured stderr, closed after it."""
    monkeypatch.setattr("dicom_node.cli.setup_logging", lambda level: None)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A data folder with an old delivered series, an old one whose result is pending, a young one."""
    world = World(tmp_path / "data", Clock(time.time() - 40 * DAY))
    delivered = world.series(2)
    world.result(world.job(delivered, JobState.DONE), DeliveryState.DELIVERED)
    pending = world.series(2)
    world.result(world.job(pending, JobState.DONE), DeliveryState.PENDING)
    world.clock.now = time.time()
    young = world.series(1)
    world.job(young, JobState.DONE)
    world.close()
    (tmp_path / "node.toml").write_text(CONFIG)
    (tmp_path / "uids").write_text("\n".join(r.sop_instance_uid for r in delivered))
    return tmp_path


def stored(folder: Path) -> int:
    return len(list((folder / "data" / "instances").rglob("*.dcm")))


def test_dry_run_lists_what_would_go_and_deletes_nothing(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["purge", "--dry-run", "--config", str(folder / "node.toml")]) == 0
    out = capsys.readouterr().out
    for uid in (folder / "uids").read_text().split():
        assert uid in out
    assert "would purge 2 input(s) and 1 result(s)" in out
    assert "kept: 2 input of a result not yet delivered to dest0" in out
    assert "kept: 1 result not yet delivered to dest0" in out
    assert "older than inputs_days 30" in out and "delivered to dest0" in out
    assert "PHANTOM" not in out  # the test data's patient name and ID
    assert stored(folder) == 5


def test_purge_deletes_audits_and_refuses_beside_a_running_node(folder: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = str(folder / "node.toml")
    lock = lock_data_dir(folder / "data")  # a node is running
    try:
        assert main(["purge", "--config", config]) == 1
        assert "--dry-run" in capsys.readouterr().err
        assert main(["purge", "--dry-run", "--config", config]) == 0  # reading beside it is fine
        assert stored(folder) == 5
    finally:
        import os

        os.close(lock)
    assert main(["purge", "--config", config]) == 0
    assert "purged 2 input(s) and 1 result(s)" in capsys.readouterr().out
    assert stored(folder) == 3
    events = [e for e in read_events(folder / "data" / "audit") if e["event"] == "retention_purged"]
    assert sorted(e["sop_instance_uid"] for e in events if e["kind"] == "input") == sorted(
        (folder / "uids").read_text().split())
    assert {e["actor"] for e in events} == {"cli"}
    assert main(["purge", "--config", config]) == 0 and "purged 0 input(s)" in capsys.readouterr().out


def test_nothing_to_purge_without_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "node.toml").write_text(CONFIG)
    assert main(["purge", "--dry-run", "--config", str(tmp_path / "node.toml")]) == 0
    assert "nothing to purge" in capsys.readouterr().out


def test_the_node_purges_by_itself_every_interval(tmp_path: Path) -> None:
    world = World(tmp_path / "data")
    records = world.series(3)
    world.result(world.job(records, JobState.DONE), DeliveryState.DELIVERED)
    world.clock.now += 2 * DAY
    policy = world.retention(RetentionSettings(inputs_days=1, results_days=1, interval_seconds=0.05,
                                               disk_check_seconds=0.05))
    stop = threading.Event()
    thread = threading.Thread(target=policy.run_until, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while world.store.index.instances() or list(world.results.root.rglob("*.dcm")):
            assert time.monotonic() < deadline, "not purged within 30 s"
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    world.close()


@pytest.mark.parametrize(("lines", "problem"), [
    ("purge_above_percent = 90\nstop_above_percent = 80", "expected less than retention.stop_above_percent"),
    ('purge_below_free = "1 GiB"', "expected more than store.min_free_space"),
    ("stop_above_percent = 100", r"from 0 \(off\) to below 100"),
    ("inputs_days = -1", "a number of 0 or more"),
    ("interval_seconds = inf", "expected a finite number"),  # round(inf) would kill the thread
    ("disk_check_seconds = nan", "expected a finite number"),
    ("results_days = nan", "expected a finite number"),
    ("purge_below_free = inf", "expected a size in bytes"),
])
def test_marks_that_could_never_work_are_refused(tmp_path: Path, lines: str, problem: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f'[store]\nmin_free_space = "2 GiB"\n[retention]\n{lines}\n')
    with pytest.raises(ConfigError, match=problem):
        load_settings(path, environ={})


def test_retention_is_off_by_default(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("")
    r = load_settings(path, environ={}).retention
    assert (r.inputs_days, r.results_days, r.purge_above_percent, r.purge_below_free, r.stop_above_percent) == (
        0, 0, 0, 0, 0)


def test_above_the_mark_with_nothing_settled_says_so_once_and_keeps_everything(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dicom_node.retention import DiskUsage

    world = World(tmp_path / "data")
    records = world.series(2)
    world.result(world.job(records, JobState.DONE), DeliveryState.PENDING)
    full = DiskUsage(total=100, used=95, free=5)
    policy = world.retention(RetentionSettings(purge_above_percent=80, stop_above_percent=90),
                             usage=lambda _: full)
    assert policy.plan().excess == 15 and policy.plan().candidates == []
    looks = []
    oldest = policy.planner.oldest
    policy.planner.oldest = lambda *a: looks.append(1) or oldest(*a)  # type: ignore[method-assign]
    for _ in range(3):
        assert policy.purge_for_space().purged == {"input": 0, "result": 0}
        world.clock.now += STUCK_RETRY_SECONDS + 1  # it looks again each time: still one WARNING
    assert len(looks) == 3
    assert policy.purge_for_space().purged == {"input": 0, "result": 0} and len(looks) == 4
    assert policy.purge_for_space().purged == {"input": 0, "result": 0} and len(looks) == 4  # a minute
    warnings = [r for r in caplog.records if "nothing more may go" in r.getMessage()]
    assert len(warnings) == 1 and "input of a result not yet delivered to dest0" in warnings[0].getMessage()
    assert "95.0% used > purge_above_percent 80" in warnings[0].getMessage()
    assert len(world.store.index.instances()) == 2
    world.close()


def test_metrics_count_what_the_policy_deleted() -> None:
    from dicom_node.web import Metrics

    metrics = Metrics()
    metrics.record("retention_purged", kind="input", size_bytes=1000, sop_instance_uid="1.2.3")
    metrics.record("retention_purged", kind="input", size_bytes=24, sop_instance_uid="1.2.4")
    metrics.record("retention_purged", kind="result", size_bytes=7, sop_instance_uid="1.2.5")
    text = metrics.render().decode()
    assert 'dicom_node_purged_total{kind="input"} 2.0' in text
    assert 'dicom_node_purged_total{kind="result"} 1.0' in text
    assert 'dicom_node_purged_bytes_total{kind="input"} 1024.0' in text


def test_a_deletion_the_file_system_refuses_fails_neither_the_purge_nor_the_next_one(
        folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from dicom_node.store.files import FileArea

    first = sorted((folder / "uids").read_text().split())[0]
    unlink = FileArea.unlink

    def refusing(self: FileArea, relative: Path) -> None:
        if relative.stem == first:
            raise PermissionError(errno.EACCES, "Permission denied")
        unlink(self, relative)

    monkeypatch.setattr(FileArea, "unlink", refusing)
    config = str(folder / "node.toml")
    assert main(["purge", "--config", config]) == 1  # done, but says a deletion was refused
    captured = capsys.readouterr()
    assert "purged 1 input(s) and 1 result(s)" in captured.out and "1 deletion(s) refused" in captured.out
    assert "1 deletion(s) were refused by the file system" in captured.err
    assert stored(folder) == 4
    # the next purge starts by resuming it: still refused, it goes on all the same
    assert main(["purge", "--config", config]) == 1 and "purged 0 input(s)" in capsys.readouterr().out
    monkeypatch.setattr(FileArea, "unlink", unlink)  # the permissions are mended
    assert main(["purge", "--config", config]) == 0
    assert "purged 1 input(s)" in capsys.readouterr().out and stored(folder) == 3

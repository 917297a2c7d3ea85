"""On a small file system (a 64 MiB tmpfs; a simulated one where mounting is not allowed): the
stop mark answers 0xA700 while the disk still has room, and above the purge mark the oldest
settled instances go, oldest first, while those whose results are pending stay."""

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from dicom_node.config import (
    ByteSize,
    InferenceSettings,
    ModelsSettings,
    RetentionSettings,
    Settings,
    StoreSettings,
    WebSettings,
    WorkersSettings,
)
from dicom_node.errors import ConfigError
from dicom_node.export.outbox import DeliveryState
from dicom_node.ingest.scp import start_ingest
from dicom_node.ingest.status import StoreStatus
from dicom_node.jobs.queue import JobState
from dicom_node.node import Node, lock_data_dir
from dicom_node.retention import DiskUsage, read_usage, store_floor, used_percent
from dicom_node.store import InstanceRecord
from tests.conftest import make_settings
from tests.factories import ct_dataset, new_uid
from tests.ingest.test_scp import association, send
from tests.retention.world import World
from tests.web.test_full_disk import http_get, small_filesystem

SIZE = 64 * 2**20
INSTANCE = 512  # rows and columns: 512 KiB of pixels
STOP, PURGE = 60.0, 40.0


@dataclass
class Ticking:
    """A clock one second further at each reading: arrival order is visible in the index."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def records(world: World, uids: list[str]) -> list[InstanceRecord]:
    found = [world.store.index.get(uid) for uid in uids]
    assert all(found)
    return found  # type: ignore[return-value]


@pytest.fixture(params=["tmpfs", "simulated"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "data"
    with small_filesystem(folder, "64m", mount=request.param == "tmpfs") as mounted:
        if not mounted:  # a 64 MiB disk whose used bytes are the files under the folder
            real = shutil.disk_usage

            def usage(path: os.PathLike[str] | str) -> DiskUsage:
                if not Path(path).is_relative_to(folder):
                    return DiskUsage(*real(path))
                used = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                return DiskUsage(SIZE, used, SIZE - used)

            monkeypatch.setattr(shutil, "disk_usage", usage)
        yield folder


def test_the_stop_mark_refuses_before_the_disk_fills_and_the_purge_mark_frees_oldest_settled(
        small_disk: Path) -> None:
    floor = store_floor(read_usage(small_disk), 0, STOP)
    assert SIZE * 0.39 < floor < SIZE * 0.41
    world = World(small_disk, Ticking(), min_free_space=floor)  # what Node.start builds
    server = start_ingest(make_settings(small_disk), world.store)
    try:
        pending = records(world, store_until_refused(server.port, new_uid(), new_uid(), count=25))
        assert len(pending) == 25  # room for all of them
        settled = records(world, store_until_refused(server.port, new_uid(), new_uid(), count=200))
        free = read_usage(small_disk).free
        assert 20 < len(settled) < 200
        assert free >= floor - 2 * INSTANCE**2  # refused with about 40% of the disk still free
        print(f"0xA700 after {len(pending) + len(settled)} instances, {free} bytes "
              f"({100 * free / SIZE:.1f}%) still free")
    finally:
        server.stop(2.0)

    world.result(world.job(pending, JobState.DONE), DeliveryState.PENDING)
    world.result(world.job(settled, JobState.DONE), DeliveryState.DELIVERED)
    policy = world.retention(RetentionSettings(purge_above_percent=PURGE, stop_above_percent=STOP))
    assert policy.plan().excess > 0 and policy.purge_by_age().purged["input"] == 0  # no ages: none
    outcome = policy.purge_for_space()
    assert used_percent(read_usage(small_disk)) <= PURGE
    left = {r.sop_instance_uid for r in world.store.index.instances()}
    assert {r.sop_instance_uid for r in pending} <= left  # a pending result keeps its inputs
    gone = [r.sop_instance_uid for r in settled if r.sop_instance_uid not in left]
    assert 0 < len(gone) == outcome.purged["input"] < len(settled)
    assert gone == [r.sop_instance_uid for r in settled[:len(gone)]]  # oldest first
    assert policy.purge_for_space().purged["input"] == 0  # under the mark: nothing more goes

    server = start_ingest(make_settings(small_disk), world.store)  # room again: stored again
    try:
        assert send(server.port, ct_dataset(size=INSTANCE)) == [(StoreStatus.SUCCESS, "")]
    finally:
        server.stop(2.0)
        world.close()


def store_until_refused(port: int, study: str, series: str, count: int) -> list[str]:
    """Send up to ``count`` instances of 512 KiB on one association; stop at the first refusal,
    which must be 0xA700. The SOP Instance UIDs stored, in order."""
    stored: list[str] = []
    with association(port) as assoc:
        assert assoc.is_established
        for i in range(count):
            ds = ct_dataset(study, series, size=INSTANCE, seed=i)
            rsp = assoc.send_c_store(ds)
            if rsp.Status != StoreStatus.SUCCESS:
                assert rsp.Status == StoreStatus.OUT_OF_RESOURCES, hex(rsp.Status)
                assert "free space" in str(rsp.ErrorComment)
                break
            stored.append(str(ds.SOPInstanceUID))
    return stored


GIB = 2**30


def fake_disk(monkeypatch: pytest.MonkeyPatch, folder: Path, total: int) -> list[int]:
    """``folder``'s file system reads as ``total`` bytes with ``free[0]`` free (change it to fill it)."""
    free = [total // 2]
    real = shutil.disk_usage

    def usage(path: os.PathLike[str] | str) -> DiskUsage:
        if not Path(path).is_relative_to(folder):
            return DiskUsage(*real(path))
        return DiskUsage(total, total - free[0], free[0])

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return free


def node_settings(tmp_path: Path, min_free_space: int, **retention: float) -> Settings:
    (tmp_path / "models").mkdir(exist_ok=True)
    return replace(make_settings(tmp_path / "data"), store=StoreSettings(min_free_space=ByteSize(min_free_space)),
                   retention=RetentionSettings(**retention), models=ModelsSettings(dir=tmp_path / "models"),
                   web=WebSettings(port=0), inference=InferenceSettings(device="cpu"),
                   workers=WorkersSettings(count=1, shutdown_grace_seconds=2))


def test_the_node_raises_its_floor_to_the_stop_mark_for_c_store_and_readyz(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    free = fake_disk(monkeypatch, tmp_path / "data", 10 * GIB)
    node = Node(node_settings(tmp_path, GIB, purge_above_percent=40, stop_above_percent=60))
    node.start()
    try:
        assert node.floor == node.store.min_free_space == 4 * GIB  # 60% used leaves 4 GiB > 1 GiB
        assert node.ingest is not None and node.web is not None
        base = f"http://127.0.0.1:{node.web.port}"
        assert http_get(base + "/readyz") == (200, b"ready\n")
        free[0] = 4 * GIB - 2**20  # 1 MiB short of the stop mark, 3 MiB over min_free_space
        status, body = http_get(base + "/readyz")
        assert status == 503 and f"floor {4 * GIB} bytes".encode() in body
        assert send(node.ingest.port, ct_dataset())[0][0] == StoreStatus.OUT_OF_RESOURCES
    finally:
        node.stop()


@pytest.mark.parametrize(("marks", "key"), [
    ({"purge_above_percent": 80.0}, "retention.purge_above_percent' = 80"),
    ({"purge_below_free": 3 * GIB // 2, "stop_above_percent": 60.0},
     f"retention.purge_below_free' = {3 * GIB // 2}"),
])
def test_a_purge_mark_at_or_below_the_floor_is_refused_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marks: dict[str, float], key: str) -> None:
    # on 4 GiB, 80% used leaves 0.8 GiB free, below min_free_space (1 GiB); a stop mark at 60%
    # raises the floor to 1.6 GiB, above purge_below_free (1.5 GiB, more than min_free_space, so
    # the config alone passes): C-STOREs would be refused before either mark is passed, forever
    fake_disk(monkeypatch, tmp_path / "data", 4 * GIB)
    settings = node_settings(tmp_path, GIB, **marks)
    node = Node(settings)
    with pytest.raises(ConfigError, match=key) as raised:
        node.start()
    assert f"file system of {4 * GIB} bytes" in str(raised.value)
    assert "at which C-STOREs are refused" in str(raised.value)
    os.close(lock_data_dir(settings.node.data_dir))  # the refused start let go of the folder


def test_the_node_starts_when_resuming_an_interrupted_purge_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from dicom_node.retention import Purger

    def broken(self: Purger) -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(Purger, "resume", broken)
    node = Node(replace(node_settings(tmp_path, 0), web=WebSettings(enabled=False)))
    node.start()  # the intents stay for the next round or start; the node serves meanwhile
    try:
        assert node.ingest is not None
        assert send(node.ingest.port, ct_dataset()) == [(StoreStatus.SUCCESS, "")]
    finally:
        node.stop()

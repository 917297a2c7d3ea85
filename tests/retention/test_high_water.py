"""On a small file system (a 64 MiB tmpfs; a simulated one where mounting is not allowed): the
stop mark answers 0xA700 while the disk still has room, and above the purge mark the oldest
settled instances go, oldest first, while those whose results are pending stay."""

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicom_node.config import RetentionSettings
from dicom_node.export.outbox import DeliveryState
from dicom_node.ingest.scp import start_ingest
from dicom_node.ingest.status import StoreStatus
from dicom_node.jobs.queue import JobState
from dicom_node.retention import DiskUsage, read_usage, store_floor, used_percent
from dicom_node.store import InstanceRecord
from tests.conftest import make_settings
from tests.factories import ct_dataset, new_uid
from tests.ingest.test_scp import association, send
from tests.retention.world import World
from tests.web.test_full_disk import small_filesystem

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
        if not mounted:  # a 16 MiB disk whose used bytes are the files under the folder
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

"""DCMTK's storescu against the size limit: the early 0xA701 is read, the association goes on
for an instance under twice the limit and is aborted for one far over it."""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.ingest.scp import IngestServer, start_ingest
from dicom_node.store import InstanceStore
from tests.conftest import make_settings, require_tool
from tests.factories import ct_dataset, save
from tests.nodeproc import echo_ok

pytestmark = pytest.mark.peers
MiB = 2**20
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK disables Nagle only with this


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[IngestServer, InstanceStore]]:
    settings = make_settings(tmp_path / "data", max_instance_size=1 * MiB, spool_threshold=256 * 1024)
    store = InstanceStore(settings.node.data_dir, 0)
    server = start_ingest(settings, store)
    yield server, store
    server.stop(grace_seconds=2.0)
    store.close()


def _storescu(port: int, *files: Path) -> subprocess.CompletedProcess[str]:
    storescu = require_tool("storescu", "dcmtk")
    return subprocess.run([storescu, "-v", "-nh", "-aec", "XAI_NODE", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, env=DCMTK_ENV, timeout=120)


def test_storescu_reads_the_refusal_and_sends_the_next_file(
    limited: tuple[IngestServer, InstanceStore], tmp_path: Path
) -> None:
    server, store = limited
    too_large, fine = ct_dataset(size=866), ct_dataset()  # 1.43 MiB of pixels, limit 1 MiB
    run = _storescu(server.port, save(too_large, tmp_path / "a"), save(fine, tmp_path / "b"))
    log = run.stdout + run.stderr
    assert "Received Store Response (Refused: OutOfResources)" in log, log
    assert "Received Store Response (Success)" in log, log
    assert store.index.get(too_large.SOPInstanceUID) is None
    assert store.index.get(fine.SOPInstanceUID) is not None
    assert not list(store.files.tmp.iterdir())


def test_storescu_sending_far_over_the_limit_is_cut_off(
    limited: tuple[IngestServer, InstanceStore], tmp_path: Path
) -> None:
    server, store = limited
    huge = ct_dataset(size=2000)  # 7.6 MiB: more than the limit plus the discard allowance
    run = _storescu(server.port, save(huge, tmp_path / "a"))
    assert run.returncode != 0
    assert not list(store.files.instances.rglob("*.dcm")) and not list(store.files.tmp.iterdir())
    assert echo_ok(server.port)

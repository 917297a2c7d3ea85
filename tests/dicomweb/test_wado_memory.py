"""Memory stays bounded: retrieving a 1 GB series (100 uncompressed instances of 10.5 MB, written
straight into a store) from a DICOMweb server in a process of its own keeps that process's RSS
growth under 100 MB while a streaming client reads and discards it."""

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.phantoms.cross_section import cross_section
from dicom_node.phantoms.dataset import phantom_uid
from dicom_node.store import InstanceStore
from dicom_node.store.keys import key_values

INSTANCES = 100
ROWS, COLUMNS = 2048, 2560  # 16 bits: 10.5 MB of pixel data each, 1.05 GB in all
LIMIT_MB = 100
REPO = Path(__file__).resolve().parents[2]


def write_series(data_dir: Path) -> tuple[str, str, int]:
    """Write the series under ``results/`` and index it as results are; (study, series, bytes)."""
    ds = cross_section(5, "CT", 32).dataset
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.PixelData = np.random.default_rng(5).integers(0, 4096, ROWS * COLUMNS, dtype=np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    store = InstanceStore(data_dir)
    total = 0
    try:
        for number in range(1, INSTANCES + 1):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = phantom_uid("big", series, number)
            ds.InstanceNumber = number
            relative = Path("results", study, series, f"{ds.SOPInstanceUID}.dcm")
            (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(data_dir / relative, enforce_file_format=True)
            total += (data_dir / relative).stat().st_size
            store.index.put_result(str(relative), ExplicitVRLittleEndian, time.time(), key_values(ds))
    finally:
        store.close()
    return study, series, total


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, int, tuple[str, str, int]]]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    written = write_series(data_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "tests.dicomweb.serve_process", str(data_dir)], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        url = child.stdout.readline().strip()  # the child prints its URL once it serves
        assert url.startswith("http://"), url
        yield url, child.pid, written
    finally:
        assert child.stdin is not None
        child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)
        shutil.rmtree(data_dir, ignore_errors=True)  # 1 GB: not left to pytest's kept folders


def test_retrieving_a_1_gb_series_keeps_rss_growth_under_100_mb(server: tuple) -> None:
    url, pid, (study, series, total) = server
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    # warm up: the first retrieve loads the code paths a retrieve needs (pydicom, aiohttp's writer)
    first = requests.get(f"{url}/studies/{study}/series/{series}/instances", params={"limit": "1"}).json()[0]
    requests.get(first["00081190"]["Value"][0], headers=accept).raise_for_status()
    baseline, peak, done = rss_bytes(pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    received, start = 0, time.monotonic()
    try:
        with requests.get(f"{url}/studies/{study}/series/{series}", headers=accept, stream=True) as answer:
            answer.raise_for_status()
            for chunk in answer.iter_content(1 << 20):
                received += len(chunk)
    finally:
        done.set()
        sampler.join()
    growth_mb = (peak[0] - baseline) / 2**20
    print(f"\n{received / 2**30:.2f} GiB in {time.monotonic() - start:.1f} s; server RSS {baseline / 2**20:.0f} MB "
          f"before, peak growth {growth_mb:.1f} MB")
    assert received > total >= 10**9  # every file, and the multipart framing
    assert growth_mb < LIMIT_MB

"""Ingest throughput of ``dicom-node serve`` against Orthanc and DCMTK's storescp, over loopback.

Sends ``--count`` CT-sized instances (512x512, 16-bit, Explicit VR Little Endian) with DCMTK's
storescu, on one association and on four at once, to the node, to Orthanc and to storescp in the
same run (so the ratios hold on a busy machine). Each receiver is started on a fresh, empty folder
for every repeat and warmed up with a few instances first; the figure reported is the median of
``--repeats`` runs. Neither Orthanc nor storescp flushes what it writes to disk; the node does.

Usage: ``.venv/bin/python bench/ingest.py [--count 300] [--repeats 3]``
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CONFIG = """[node]
ae_title = "XAI_NODE"
bind = "127.0.0.1"
port = 0
data_dir = "data"
[store]
min_free_space = 0
[logging]
level = "WARNING"
"""
ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK disables Nagle only with this set
STREAMS = 4
ORTHANC = "Orthanc"  # Debian's package installs /usr/sbin/Orthanc
WARMUP = 3
Starter = Callable[[Path, int], tuple[subprocess.Popen, Path]]


def make_instance(study: str, series: str, number: int, pixels: np.ndarray) -> Dataset:
    """One CT Image Storage instance of PHANTOM^BENCH with the given pixel data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID, ds.Modality = "PHANTOM^BENCH", "BENCH", "CT"
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    return ds


def generate(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` instances of one study and series into ``folder``; return their paths."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        pixels = rng.integers(0, 4096, size=(512, 512), dtype=np.uint16)
        path = folder / f"ct{number:04d}.dcm"
        make_instance(study, series, number, pixels).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def split(paths: list[Path], root: Path, parts: int) -> list[Path]:
    """Hard-link ``paths`` into ``parts`` sub-folders of ``root`` of (nearly) equal size."""
    folders = [root / f"part{i}" for i in range(parts)]
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True)
        for path in paths[i::parts]:
            os.link(path, folder / path.name)
    return folders


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_accepting(aet: str, port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll with echoscu until the SCP on ``port`` answers C-ECHO, or raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{aet} exited with {proc.returncode} before accepting")
        echo = subprocess.run(["echoscu", "-aec", aet, "127.0.0.1", str(port)], env=ENV,
                              capture_output=True, check=False)
        if echo.returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{aet} on port {port} did not accept within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc`` by its PID and wait; SIGKILL it if it has not exited after 30 s."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def start_node(work: Path, port: int) -> tuple[subprocess.Popen, Path]:
    """Start ``dicom-node serve`` on a fresh data folder; return it and its instances folder."""
    config = work / "node.toml"
    config.write_text(CONFIG)
    data = work / "data"
    cmd = [sys.executable, "-m", "dicom_node", "serve", "--config", str(config),
           "--port", str(port), "--data-dir", str(data)]
    with (work / "node.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    return proc, data / "instances"


def start_storescp(work: Path, port: int, fork: bool) -> tuple[subprocess.Popen, Path]:
    """Start DCMTK's storescp writing into a fresh folder; return it and that folder."""
    out = work / "out"
    out.mkdir()
    cmd = ["storescp", *(["--fork"] if fork else []), "-aet", "STORESCP", "-od", str(out), str(port)]
    with (work / "storescp.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    return proc, out


def start_orthanc(work: Path, port: int) -> tuple[subprocess.Popen, Path]:
    """Start Orthanc with a temporary config and storage folder; return it and that folder.

    Its HTTP server is on, on loopback only, on a free port (Orthanc needs one to start cleanly).
    """
    storage = work / "storage"
    config = work / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(storage), "IndexDirectory": str(work / "index"),
        "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
        "Plugins": [],
    }))
    with (work / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT, env=ENV)
    return proc, storage


def send(aet: str, port: int, folders: list[Path]) -> float:
    """Run one storescu per folder at once; return the wall time until all have exited 0."""
    cmd = ["storescu", "-aec", aet, "127.0.0.1", str(port), "+sd"]
    start = time.perf_counter()
    procs = [subprocess.Popen([*cmd, str(f)], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for f in folders]
    try:
        errors = [p.communicate()[1] for p in procs]
        elapsed = time.perf_counter() - start
    finally:
        for proc in procs:
            stop(proc)
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu exited {proc.returncode}: {err.decode(errors='replace')}")
    return elapsed


def count_files(folder: Path) -> int:
    """Regular files anywhere below ``folder``."""
    return sum(1 for p in folder.rglob("*") if p.is_file())


def measure(start: Starter, aet: str, folders: list[Path], warmup: Path, expected: int) -> float:
    """Start a receiver on a fresh folder, warm it up, time one send; return instances/s."""
    with tempfile.TemporaryDirectory(prefix="recv-", dir=warmup.parent) as tmp:
        port = free_port()
        proc, received = start(Path(tmp), port)
        try:
            wait_accepting(aet, port, proc)
            send(aet, port, [warmup])
            seconds = send(aet, port, folders)
        finally:
            stop(proc)
        got = count_files(received) - WARMUP
        if got != expected:
            log = b"".join(p.read_bytes()[-2000:] for p in Path(tmp).glob("*.log"))
            raise RuntimeError(f"{aet}: {got} of {expected} instances arrived; log: {log!r}")
    return expected / seconds


def machine() -> str:
    """nproc, the CPU model and the DCMTK version, one per line."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    version = subprocess.run(["storescu", "--version"], capture_output=True, text=True, check=True)
    return (f"nproc: {len(os.sched_getaffinity(0))}\ncpu: {model}\n"
            f"dcmtk: {version.stdout.splitlines()[0]}\npython: {sys.version.split()[0]}")


def run(count: int, repeats: int, root: Path) -> dict[tuple[str, int], float]:
    """Measure every receiver on 1 and STREAMS associations; return the median rates."""
    files = generate(root / "all", count)
    generate(root / "warmup", WARMUP, seed=1)
    layouts = {1: [root / "all"], STREAMS: split(files, root / "split", STREAMS)}
    receivers: dict[str, tuple[str, Callable[[int], Starter]]] = {
        "dicom-node": ("XAI_NODE", lambda n: start_node),
        "orthanc": ("ORTHANC", lambda n: start_orthanc),
        "storescp": ("STORESCP", lambda n: lambda w, p: start_storescp(w, p, fork=n > 1)),
    }
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for streams, folders in layouts.items():
            for name, (aet, starter) in receivers.items():
                rate = measure(starter(streams), aet, folders, root / "warmup", count)
                rates.setdefault((name, streams), []).append(rate)
                print(f"  {name:<10} {streams} assoc: {rate:7.1f} instances/s", flush=True)
    return {key: statistics.median(values) for key, values in rates.items()}


def report(medians: dict[tuple[str, int], float], count: int, repeats: int) -> None:
    """Print the table of medians and the node/Orthanc and node/storescp ratios."""
    print(f"\n{count} instances, median of {repeats}")
    print(f"{'receiver':<12}{'associations':>13}{'instances/s':>13}")
    for (name, streams), rate in sorted(medians.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{name:<12}{streams:>13}{rate:>13.1f}")
    for streams in (1, STREAMS):
        node = medians[("dicom-node", streams)]
        print(f"node/orthanc, {streams} association(s): {node / medians[('orthanc', streams)]:.2f}")
        print(f"node/storescp, {streams} association(s): {node / medians[('storescp', streams)]:.2f}")


def main() -> int:
    """Parse arguments, run the benchmark in a temporary folder and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="instances per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        parser.error("DCMTK (storescu, storescp, echoscu) is not on PATH")
    if shutil.which(ORTHANC) is None:
        parser.error(f"{ORTHANC} is not on PATH (Debian: apt install orthanc; it is in /usr/sbin)")
    print(machine())
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        medians = run(args.count, args.repeats, Path(tmp))
        size = (Path(tmp) / "all" / "ct0001.dcm").stat().st_size
    print(f"instance size: {size} bytes")
    report(medians, args.count, args.repeats)
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

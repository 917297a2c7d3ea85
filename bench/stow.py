"""STOW-RS ingest rate against C-STORE's, into a node store, over loopback.

The same ``--count`` instances of about 0.5 MB (512x512, 16-bit, Explicit VR Little Endian) go
to a fresh store twice per round: with DCMTK's storescu on one association to ``dicom-node
serve`` (the node's real ingest server, ``TCP_NODELAY=1``), and as one STOW-RS request (parts
streamed from the files, chunked) to the node's DICOMweb application served alone over the same
kind of store in a process of its own (this script, ``--serve``). Each receiver is warmed up with
a few instances first; the figures are medians of ``--repeats`` rounds, and the ratio is
STOW-RS time over C-STORE time (the target: at most 1.2).

Usage: ``.venv/bin/python bench/stow.py [--count 300] [--repeats 3]``
"""

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests
from aiohttp import web

from bench.ingest import (
    ENV,
    WARMUP,
    count_files,
    free_port,
    generate,
    machine,
    send,
    start_node,
    stop,
    wait_accepting,
)
from dicom_node.audit import NO_AUDIT
from dicom_node.dicomweb import PREFIX, DicomWebContext, make_app
from dicom_node.store import InstanceStore

_CHUNK = 2**18


def serve(data_dir: Path, port: int) -> None:
    """Serve the DICOMweb application over a store in ``data_dir`` until killed (``--serve``)."""
    logging.basicConfig(level=logging.WARNING)
    store = InstanceStore(data_dir)
    root = web.Application()
    root.add_subapp(PREFIX, make_app(DicomWebContext(store=store, audit=NO_AUDIT, max_instance_size=2**30)))
    web.run_app(root, host="127.0.0.1", port=port, print=None, access_log=None)


def start_stow(work: Path, port: int) -> tuple[subprocess.Popen, Path]:
    """Start this script's ``--serve`` on a fresh data folder; return it and its instances folder."""
    data = work / "data"
    with (work / "stow.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(data), str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=ENV)
    return proc, data / "instances"


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll until the server answers at all (any status), or raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"STOW-RS server exited with {proc.returncode} before accepting")
        try:
            requests.get(url, timeout=5)
            return
        except requests.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def body(files: list[Path], boundary: str) -> Iterator[bytes]:
    """A multipart/related body of ``files``, read in bounded chunks as it is sent."""
    for path in files:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def stow(url: str, folder: Path) -> float:
    """POST every file of ``folder`` in one STOW-RS request; return the wall time to the answer."""
    files = sorted(folder.iterdir())
    boundary = uuid.uuid4().hex
    start = time.perf_counter()
    response = requests.post(f"{url}/studies", data=body(files, boundary), timeout=600, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"STOW-RS answered {response.status_code}: {response.text[:500]}")
    return elapsed


def measure_cstore(folder: Path, warmup: Path, expected: int, work: Path) -> float:
    """C-STORE of ``folder`` on one association to a fresh ``dicom-node serve``; seconds."""
    with tempfile.TemporaryDirectory(prefix="cstore-", dir=work) as tmp:
        port = free_port()
        proc, received = start_node(Path(tmp), port)
        try:
            wait_accepting("XAI_NODE", port, proc)
            send("XAI_NODE", port, [warmup])
            seconds = send("XAI_NODE", port, [folder])
        finally:
            stop(proc)
        check(received, expected, "C-STORE")
    return seconds


def measure_stow(folder: Path, warmup: Path, expected: int, work: Path) -> float:
    """STOW-RS of ``folder`` in one request to a fresh DICOMweb server; seconds."""
    with tempfile.TemporaryDirectory(prefix="stow-", dir=work) as tmp:
        port = free_port()
        proc, received = start_stow(Path(tmp), port)
        url = f"http://127.0.0.1:{port}{PREFIX}"
        try:
            wait_http(url, proc)
            stow(url, warmup)
            seconds = stow(url, folder)
        finally:
            stop(proc)
        check(received, expected, "STOW-RS")
    return seconds


def check(received: Path, expected: int, name: str) -> None:
    got = count_files(received) - WARMUP
    if got != expected:
        raise RuntimeError(f"{name}: {got} of {expected} instances arrived")


def run(count: int, repeats: int, root: Path) -> dict[str, float]:
    """Alternate C-STORE and STOW-RS rounds on the same files; return the median seconds."""
    generate(root / "all", count)
    generate(root / "warmup", WARMUP, seed=1)
    times: dict[str, list[float]] = {"C-STORE": [], "STOW-RS": []}
    for _ in range(repeats):
        for name, measure in (("C-STORE", measure_cstore), ("STOW-RS", measure_stow)):
            seconds = measure(root / "all", root / "warmup", count, root)
            times[name].append(seconds)
            print(f"  {name:<8} {seconds:6.2f} s  {count / seconds:7.1f} instances/s", flush=True)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> int:
    """Parse arguments, run the benchmark in a temporary folder and print the results."""
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="instances per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median)")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        parser.error("DCMTK (storescu, echoscu) is not on PATH")
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp:
        medians = run(args.count, args.repeats, Path(tmp))
        size = (Path(tmp) / "all" / "ct0001.dcm").stat().st_size
    print(f"\n{args.count} instances of {size} bytes, median of {args.repeats}")
    for name, seconds in medians.items():
        print(f"{name:<8} {seconds:6.2f} s  {args.count / seconds:7.1f} instances/s")
    print(f"STOW-RS/C-STORE time: {medians['STOW-RS'] / medians['C-STORE']:.2f} (target <= 1.2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

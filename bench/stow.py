"""STOW-RS ingest rate against C-STORE's, into the same node, over loopback.

The same ``--count`` instances of about 0.5 MB (512x512, 16-bit, Explicit VR Little Endian) go,
in each round, to two fresh ``dicom-node serve`` processes of one configuration (the node's
ingest server and its web server, DICOMweb mounted at ``/dicom-web``, behind a bearer token):
with DCMTK's storescu on one association (``TCP_NODELAY=1``) to the first, and as one STOW-RS
request (parts streamed from the files, chunked) to the web port of the second. Each node is
warmed up the same way in with a few instances first; the figures are medians of
``--repeats`` rounds, and the ratio is STOW-RS time over C-STORE time (the target: at most 1.2).

Usage: ``.venv/bin/python bench/stow.py [--count 300] [--repeats 3]``
"""

import argparse
import os
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

from bench.ingest import (
    CONFIG,
    ENV,
    WARMUP,
    count_files,
    free_port,
    generate,
    machine,
    send,
    stop,
    wait_accepting,
)
from dicom_node.dicomweb import PREFIX

_CHUNK = 2**18
TOKEN = "bench-stow-token-0123456789"


def start_node(work: Path, port: int, web_port: int) -> tuple[subprocess.Popen, Path]:
    """Start ``dicom-node serve`` (ingest on ``port``, web with DICOMweb on ``web_port``, the
    bearer token :data:`TOKEN`, no pipeline) on a fresh data folder; return it and its
    instances folder."""
    config = work / "node.toml"
    config.write_text(CONFIG + f'[web]\nport = {web_port}\ntoken = "{TOKEN}"\ndicomweb = true\n')
    data = work / "data"
    cmd = [sys.executable, "-m", "dicom_node", "serve", "--config", str(config),
           "--port", str(port), "--data-dir", str(data)]
    with (work / "node.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    return proc, data / "instances"


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll the node's ``/readyz`` until it answers 200, or raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dicom-node serve exited with {proc.returncode} before it was ready")
        try:
            if requests.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{base}/readyz did not answer 200 within {timeout} s")


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
    """POST every file of ``folder`` in one STOW-RS request (with the bearer token); return the
    wall time to the answer."""
    files = sorted(folder.iterdir())
    boundary = uuid.uuid4().hex
    start = time.perf_counter()
    response = requests.post(f"{url}/studies", data=body(files, boundary), timeout=600, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json", "Authorization": f"Bearer {TOKEN}"})
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"STOW-RS answered {response.status_code}: {response.text[:500]}")
    return elapsed


def measure(way: str, folder: Path, warmup: Path, expected: int, work: Path) -> float:
    """``folder`` sent ``way`` ("C-STORE": storescu on one association; "STOW-RS": one request
    to the web port) to a fresh ``dicom-node serve``, warmed up the same way; seconds."""
    with tempfile.TemporaryDirectory(prefix=f"{way.lower()}-", dir=work) as tmp:
        port, web_port = free_port(), free_port()
        proc, received = start_node(Path(tmp), port, web_port)
        base = f"http://127.0.0.1:{web_port}"
        try:
            wait_accepting("XAI_NODE", port, proc)
            wait_ready(base, proc)
            if way == "C-STORE":
                send("XAI_NODE", port, [warmup])
                seconds = send("XAI_NODE", port, [folder])
            else:
                stow(base + PREFIX, warmup)
                seconds = stow(base + PREFIX, folder)
        finally:
            stop(proc)
        got = count_files(received) - WARMUP
        if got != expected:
            raise RuntimeError(f"{way}: {got} of {expected} instances arrived")
    return seconds


def run(count: int, repeats: int, root: Path) -> dict[str, float]:
    """Alternate C-STORE and STOW-RS rounds on the same files; return the median seconds."""
    generate(root / "all", count)
    generate(root / "warmup", WARMUP, seed=1)
    times: dict[str, list[float]] = {"C-STORE": [], "STOW-RS": []}
    for _ in range(repeats):
        for way in times:
            seconds = measure(way, root / "all", root / "warmup", count, root)
            times[way].append(seconds)
            print(f"  {way:<8} {seconds:6.2f} s  {count / seconds:7.1f} instances/s", flush=True)
    return {way: statistics.median(values) for way, values in times.items()}


def load() -> str:
    return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    """Parse arguments, run the benchmark in a temporary folder and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="instances per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median)")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        parser.error("DCMTK (storescu, echoscu) is not on PATH")
    print(machine())
    print(f"before: {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp:
        medians = run(args.count, args.repeats, Path(tmp))
        size = (Path(tmp) / "all" / "ct0001.dcm").stat().st_size
    print(f"after: {load()}")
    print(f"\n{args.count} instances of {size} bytes, median of {args.repeats}")
    for way, seconds in medians.items():
        print(f"{way:<8} {seconds:6.2f} s  {args.count / seconds:7.1f} instances/s")
    print(f"STOW-RS/C-STORE time: {medians['STOW-RS'] / medians['C-STORE']:.2f} (target <= 1.2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What DICOM TLS costs on ingest: the node's TLS port against its plain port, in the same run.

Sends ``--count`` CT-sized instances (512x512, 16-bit, Explicit VR Little Endian, as
``bench/ingest.py``) with DCMTK's storescu over one association to ``dicom-node serve``
listening on both ports, once in plain DICOM and once with ``+tls`` (a client certificate from
the node's CA, made with trustme), and, as the anchor, to DCMTK's storescp plain and with
``+tls``. Each receiver is warmed up with a few instances first; the figure reported is the
median of ``--repeats`` runs, and the ratio is TLS over plain for each receiver.

Usage: ``.venv/bin/python bench/tls.py [--count 200] [--repeats 3]``
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from ingest import make_instance  # type: ignore[import-not-found]
from pydicom.uid import generate_uid

from tests.nodeproc import CONFIG, NodeProcess, free_port
from tests.tls.pki import Pki, make_pki

ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK disables Nagle only with this set
WARMUP = 3


def write_instances(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, (512, 512), dtype=np.uint16)
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.dcm"
        make_instance(study, series, i + 1, pixels).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, paths: list[Path], tls: list[str]) -> float:
    """Seconds storescu takes to send ``paths`` on one association."""
    start = time.perf_counter()
    subprocess.run([shutil.which("storescu") or "storescu", "-aec", "XAI_NODE", *tls, "127.0.0.1", str(port),
                    *map(str, paths)], env=ENV, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start


def node_rates(work: Path, pki: Pki, paths: list[Path], warm: list[Path], repeats: int) -> dict[str, float]:
    rates: dict[str, list[float]] = {"plain": [], "tls": []}
    client = ["+tls", str(pki.client.private_key), str(pki.client.certificate), "+cf", str(pki.ca)]
    for repeat in range(repeats):
        folder = work / f"node-{repeat}"
        folder.mkdir()
        tls_port = free_port()
        (folder / "node.toml").write_text(
            CONFIG.format(grace=5.0, web_port=free_port()).replace(
                'bind = "127.0.0.1"\n', 'bind = "127.0.0.1"\nlisten = ["plain", "tls"]\n').replace(
                'level = "INFO"', 'level = "WARNING"')
            + f'[tls]\nport = {tls_port}\ncertificate = "{pki.node.certificate}"\n'
              f'private_key = "{pki.node.private_key}"\nca_certificates = ["{pki.ca}"]\n')
        with NodeProcess(folder) as node:
            for mode, port, tls in (("plain", node.port, []), ("tls", tls_port, client)):
                storescu(port, warm, tls)
                rates[mode].append(len(paths) / storescu(port, paths, tls))
            node.stop()
        shutil.rmtree(folder)
    return {mode: statistics.median(values) for mode, values in rates.items()}


def storescp_rates(work: Path, pki: Pki, paths: list[Path], warm: list[Path],
                   repeats: int) -> dict[str, float]:
    rates: dict[str, list[float]] = {"plain": [], "tls": []}
    server = ["+tls", str(pki.node.private_key), str(pki.node.certificate), "+cf", str(pki.ca)]
    client = ["+tls", str(pki.client.private_key), str(pki.client.certificate), "+cf", str(pki.ca)]
    for repeat in range(repeats):
        for mode in ("plain", "tls"):
            folder = work / f"storescp-{repeat}-{mode}"
            folder.mkdir()
            port = free_port()
            proc = subprocess.Popen([shutil.which("storescp") or "storescp", "-od", str(folder),
                                     *(server if mode == "tls" else []), str(port)], env=ENV)
            try:
                time.sleep(0.5)  # storescp has no readiness signal; it binds at once
                tls = client if mode == "tls" else []
                storescu(port, warm, tls)
                rates[mode].append(len(paths) / storescu(port, paths, tls))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
            shutil.rmtree(folder)
    return {mode: statistics.median(values) for mode, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        paths = write_instances(work / "instances", args.count)
        warm = write_instances(work / "warm", WARMUP)
        results = {"dicom-node": node_rates(work, pki, paths, warm, args.repeats),
                   "storescp": storescp_rates(work, pki, paths, warm, args.repeats)}
    print(f"{args.count} instances of 525 056 bytes, one association, median of {args.repeats}")
    print("| receiver | plain instances/s | TLS instances/s | TLS / plain |")
    print("| --- | --- | --- | --- |")
    for receiver, rate in results.items():
        print(f"| {receiver} | {rate['plain']:.1f} | {rate['tls']:.1f} | {rate['tls'] / rate['plain']:.2f} |")


if __name__ == "__main__":
    main()

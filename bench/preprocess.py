"""Preprocessing time and peak memory for a 2000x2000 16-bit CR, uncompressed and JPEG 2000.

Each case runs in a fresh child process: the file is read from disk, then
``dicom_node.inference.preprocess`` (decode, Modality LUT, VOI, letterbox to the demo model's
input) runs ``--repeats`` times. Printed: median and minimum time per instance, the peak Python
heap during one call (tracemalloc, numpy arrays included) and the child's peak resident memory
(ru_maxrss, decoders' C buffers included) above what it held after imports.

Usage: ``.venv/bin/python bench/preprocess.py [--repeats 10] [--size 256]``
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

CASES = {"uncompressed": None, "jpeg2000-lossless": "1.2.840.10008.1.2.4.90"}


def write_cases(folder: Path) -> dict[str, Path]:
    """The same 2000x2000, 16-bit CR phantom, once per transfer syntax."""
    from pydicom.uid import UID

    from dicom_node.phantoms import render, to_dataset

    paths = {}
    for name, syntax in CASES.items():
        ds = to_dataset(render(1, 2000), modality="CR", bits_stored=16)
        if syntax is not None:
            ds.compress(UID(syntax), encoding_plugin="pylibjpeg")
        paths[name] = folder / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return paths


def measure(path: Path, repeats: int, size: int) -> dict[str, float]:
    """Run in the child: time and memory of reading and preprocessing ``path``."""
    from pydicom import dcmread

    from dicom_node.inference import InputSpec, preprocess

    spec = InputSpec(size=size)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        preprocess(dcmread(path), spec)
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    preprocess(dcmread(path), spec)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline  # KiB on Linux
    return {"median_ms": statistics.median(times) * 1000, "min_ms": min(times) * 1000,
            "heap_peak_mib": peak / 2**20, "rss_growth_mib": rss / 1024,
            "file_mib": path.stat().st_size / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="model input side")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.repeats, args.size)))
        return 0
    print(f"python {sys.version.split()[0]}; 2000x2000 16-bit CR; input {args.size} px; "
          f"median of {args.repeats}")
    print(f"{'case':<20}{'file MiB':>9}{'median ms':>11}{'min ms':>9}{'heap peak MiB':>15}"
          f"{'RSS growth MiB':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in write_cases(Path(tmp)).items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(path), "--repeats", str(args.repeats),
                 "--size", str(args.size)], capture_output=True, text=True, check=True,
            )
            r = json.loads(out.stdout)
            print(f"{name:<20}{r['file_mib']:>9.1f}{r['median_ms']:>11.1f}{r['min_ms']:>9.1f}"
                  f"{r['heap_peak_mib']:>15.1f}{r['rss_growth_mib']:>16.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

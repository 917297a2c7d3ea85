"""Per-instance cost of the structural check of received data sets (issue #12).

Stages the same instance many times through ``InstanceStore.stage`` as it is now (every element
header walked, the data set copied in 1 MiB chunks, header parsed) and through the previous
path, kept here as the anchor (data set written in one piece, header parsed), and times the walk
alone. Two instances: a 512x512 CT and a 2048x2048 CR, 16-bit, both with the ~100-element header
of pydicom's ``CT_small.dcm``; the CR also staged from a spool file, as ingest does for data sets
past ``ingest.spool_threshold``.

Usage: ``.venv/bin/python bench/validate.py [--repeats 40] [--no-fsync]``
"""

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.store import InstanceStore
from dicom_node.store.files import encode_file_meta, read_header
from dicom_node.store.walk import walk


def instance(modality: str, size: int) -> tuple[Any, bytes]:
    """(file meta, data set bytes) of an instance with a real header and ``size``² pixels."""
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.Rows, ds.Columns = modality, size, size
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, (size, size), np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    head = encode_file_meta(ds.file_meta)
    return ds.file_meta, buffer.getvalue()[len(head):]


def timed(repeats: int, step: Callable[[], None]) -> float:
    """Median milliseconds of ``step``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(store: InstanceStore, name: str, meta: Any, data: bytes, repeats: int) -> None:
    """Print the table rows of one instance, in memory and spooled."""

    def anchor() -> None:  # the previous stage(): write in one piece, parse the header
        temporary = store.files.write_temporary([encode_file_meta(meta), data])
        read_header(temporary)
        temporary.unlink()

    walk_ms = timed(repeats, lambda: walk(io.BytesIO(data), 0, len(data), ExplicitVRLittleEndian))
    before = timed(repeats, anchor)
    now = timed(repeats, lambda: store.discard(store.stage(meta, io.BytesIO(data))))
    print(f"| {name} | {len(data)} | {walk_ms:.3f} | {before:.2f} | {now:.2f} | {now / before:.2f} |")
    spool = store.files.tmp / "bench-spool.part"
    spool.write_bytes(data)
    with spool.open("rb") as fp:
        now = timed(repeats, lambda: store.discard(store.stage(meta, fp)))
    spool.unlink()
    print(f"| {name}, spooled | {len(data)} | | {before:.2f} | {now:.2f} | {now / before:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--no-fsync", action="store_true",
                        help="skip fsync (both paths) to see the CPU and copy cost alone")
    args = parser.parse_args()
    repeats = args.repeats
    if args.no_fsync:
        os.fsync = lambda fd: None  # fsync latency on a shared VM varies more than what is measured
    with tempfile.TemporaryDirectory() as folder:
        store = InstanceStore(Path(folder))
        print("| instance | data set bytes | walk alone ms | stage before ms | stage now ms | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, modality, size in (("CT 512x512", "CT", 512), ("CR 2048x2048", "CR", 2048)):
            meta, data = instance(modality, size)
            measure(store, name, meta, data, repeats)
        store.close()


if __name__ == "__main__":
    main()

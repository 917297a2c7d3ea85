"""Per-instance cost of the structural check of received data sets (issue #12).

Stages the same instance many times through ``InstanceStore.stage`` as it is now (every element
header walked, the data set copied in 1 MiB chunks, header parsed) and through the previous
path, kept here as the anchor (data set written in one piece, header parsed), and times the walk
alone. Two instances: a 512x512 CT and a 2048x2048 CR, 16-bit, both with the ~100-element header
of pydicom's ``CT_small.dcm``; the CR also staged from a spool file, as ingest does for data sets
past ``ingest.spool_threshold``.

Usage: ``.venv/bin/python bench/validate.py [--repeats 40]``
"""

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.store import InstanceStore
from dicom_node.store.files import encode_file_meta, read_header
from dicom_node.store.walk import walk


def instance(modality: str, size: int) -> tuple[object, bytes]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    repeats = parser.parse_args().repeats
    with tempfile.TemporaryDirectory() as folder:
        store = InstanceStore(Path(folder))

        def anchor(meta: object, data: bytes) -> None:  # the previous stage(): write, parse
            temporary = store.files.write_temporary([encode_file_meta(meta), data])  # type: ignore[arg-type]
            read_header(temporary)
            temporary.unlink()

        def staged(meta: object, source: io.BytesIO | io.BufferedReader) -> None:
            store.discard(store.stage(meta, source))  # type: ignore[arg-type]

        print("| instance | data set bytes | walk alone ms | stage before ms | stage now ms | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, modality, size in (("CT 512x512", "CT", 512), ("CR 2048x2048", "CR", 2048)):
            meta, data = instance(modality, size)
            walk_ms = timed(repeats, lambda: walk(io.BytesIO(data), 0, len(data), ExplicitVRLittleEndian))
            before = timed(repeats, lambda: anchor(meta, data))
            now = timed(repeats, lambda: staged(meta, io.BytesIO(data)))
            print(f"| {name} | {len(data)} | {walk_ms:.3f} | {before:.2f} | {now:.2f} | {now / before:.2f} |")
            spool = Path(folder) / "spool.part"
            spool.write_bytes(data)
            with spool.open("rb") as fp:
                now = timed(repeats, lambda: staged(meta, fp))
            print(f"| {name}, spooled | {len(data)} | | {before:.2f} | {now:.2f} | {now / before:.2f} |")
        store.close()


if __name__ == "__main__":
    main()

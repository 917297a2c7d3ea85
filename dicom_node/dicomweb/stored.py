"""A stored instance's file as WADO-RS reads it: the header without its bulk values, where the
pixel data and other large binary values lie in the file, and one frame at a time.

Nothing here loads a whole pixel data element: headers are read with ``stop_before_pixels`` and
``defer_size``; a native frame is read by its offset, an encapsulated one by pydicom's
:func:`~pydicom.encaps.get_frame` from the open file. Only a deflated file (rare, and small: it
is inflated whole by pydicom) and a frame asked for uncompressed from a compressed file are
decoded. Every function here blocks: call it off the event loop.
"""

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.encaps import get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless, JPEGLSLossless, JPEGLSNearLossless, RLELossless

from dicom_node.dicomweb.dicomjson import BULK_VRS

#: Values larger than this are left in the file and sent by bulk data URI.
DEFER_SIZE = 4096
PIXEL_DATA = 0x7FE00010
#: The media type of each compressed transfer syntax the node accepts (PS3.18 8.7.3).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    JPEGLSLossless: "image/jls", JPEGLSNearLossless: "image/jls",
    JPEG2000Lossless: "image/jp2", JPEG2000: "image/jp2", RLELossless: "image/dicom-rle",
}


@dataclass(frozen=True)
class Value:
    """Where a bulk value lies in the file: its VR, the offset of its first byte and its length
    (``offset`` None in a deflated file, where only pydicom can reach it)."""

    vr: str
    offset: int | None
    length: int


@dataclass(frozen=True)
class Header:
    """An instance's header without its bulk values, and where those lie."""

    dataset: Dataset
    transfer_syntax: UID
    bulk: dict[int, Value] = field(default_factory=dict)

    @property
    def pixels(self) -> Value | None:
        return self.bulk.get(PIXEL_DATA)

    @property
    def frames(self) -> int:
        """Number of Frames (1 when absent or malformed); 0 without pixel data."""
        if self.pixels is None:
            return 0
        try:
            return max(1, int(self.dataset.get("NumberOfFrames") or 1))
        except (TypeError, ValueError):
            return 1

    @property
    def frame_size(self) -> int | None:
        """Bytes of one native frame, or None where frames are not whole bytes (1 bit) or unknown."""
        ds = self.dataset
        try:
            bits = int(ds.BitsAllocated)
            size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * bits
        except (AttributeError, TypeError, ValueError):
            return None
        return size // 8 if bits % 8 == 0 else None


def read_header(path: Path) -> Header:
    """Read ``path``'s header, leaving its bulk values (pixel data, values over
    :data:`DEFER_SIZE` bytes of a binary VR) in the file.

    Raises
    ------
    OSError, pydicom.errors.InvalidDicomError
        The file is missing or is not DICOM.
    """
    with path.open("rb") as fp:
        ds = dcmread(fp, stop_before_pixels=True, defer_size=DEFER_SIZE)
        syntax = UID(str(ds.file_meta.TransferSyntaxUID))
        pixels = _pixel_value(fp, ds, syntax)
    if syntax.is_deflated:
        # offsets in a deflated file mean nothing, and pydicom would read a deferred value
        # from the wrong place: read the (inflated, small) header whole, then take its bulk out
        ds = dcmread(path, stop_before_pixels=True)
        bulk = _large(ds)
    else:
        bulk = _deferred(ds)
    if pixels is not None:
        bulk[PIXEL_DATA] = pixels
    return Header(ds, syntax, bulk)


def _deferred(ds: Dataset) -> dict[int, Value]:
    """The top-level binary values pydicom left in the file, taken out of ``ds``."""
    found: dict[int, Value] = {}
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            vr = str(raw.VR or dictionary_VR(tag)).split(" or ")[0]
            if vr in BULK_VRS:
                found[int(tag)] = Value(vr, raw.value_tell, raw.length)
                del ds[tag]
    return found


def _large(ds: Dataset) -> dict[int, Value]:
    """The top-level binary values over :data:`DEFER_SIZE` bytes of a header read whole, taken
    out of ``ds`` (reachable by :func:`bulk_value` only)."""
    found: dict[int, Value] = {}
    for element in list(ds):
        if element.VR in BULK_VRS and element.value is not None and len(element.value) > DEFER_SIZE:
            found[int(element.tag)] = Value(element.VR, None, len(element.value))
            del ds[element.tag]
    return found


def _pixel_value(fp: object, ds: Dataset, syntax: UID) -> Value | None:
    """Where (7FE0,0010) lies: pydicom stopped with the file at its tag."""
    if syntax.is_deflated:
        vr = "OW" if int(ds.get("BitsAllocated") or 8) > 8 else "OB"
        return Value(vr, None, 0) if _has_pixels_deflated(ds) else None
    little = syntax.is_little_endian
    head = fp.read(12)  # type: ignore[attr-defined]
    if len(head) < 8:
        return None
    group, element = struct.unpack("<HH" if little else ">HH", head[:4])
    if (group << 16 | element) != PIXEL_DATA:
        return None
    start = fp.tell() - 12  # type: ignore[attr-defined]
    if syntax.is_implicit_VR:
        (length,) = struct.unpack("<L", head[4:8])
        vr = "OW" if int(ds.get("BitsAllocated") or 8) > 8 else "OB"
        return Value(vr, start + 8, length)
    (length,) = struct.unpack("<L" if little else ">L", head[8:12])
    return Value(head[4:6].decode("ascii", "replace"), start + 12, length)


def _has_pixels_deflated(ds: Dataset) -> bool:
    return "Rows" in ds and "Columns" in ds


def frame(path: Path, header: Header, index: int, *, native: bool) -> bytes:
    """Frame ``index`` (0-based): native little-endian bytes if ``native`` or the file is
    uncompressed, else the frame's bitstream as stored."""
    pixels = header.pixels
    assert pixels is not None
    compressed = header.transfer_syntax.is_encapsulated
    size = header.frame_size
    if not compressed and pixels.offset is not None and size is not None:
        with path.open("rb") as fp:
            fp.seek(pixels.offset + index * size)
            data = fp.read(size)
        if not header.transfer_syntax.is_little_endian and int(header.dataset.BitsAllocated) > 8:
            word = np.dtype(f">u{int(header.dataset.BitsAllocated) // 8}")
            data = np.frombuffer(data, word).astype(word.newbyteorder("<")).tobytes()
        return data
    if compressed and not native and pixels.offset is not None:
        with path.open("rb") as fp:
            fp.seek(pixels.offset)
            return get_frame(fp, index, number_of_frames=header.frames)
    if header.transfer_syntax.is_deflated and size is not None:
        return bytes(dcmread(path).PixelData[index * size:(index + 1) * size])  # inflated whole: small
    array = pixel_array(str(path), index=index, raw=True)  # decompression asked for
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()


def bulk_value(path: Path, header: Header, tag: int) -> bytes:
    """A non-pixel bulk value of a deflated file (the only ones not read by offset)."""
    return bytes(dcmread(path, stop_before_pixels=True)[tag].value)

"""Malformed data sets, built from a valid CT in code: what a broken or hostile peer sends.

Each case is the data set's bytes (without file meta) and the transfer syntax it is sent in.
"""

import io
import random
import struct
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from dicom_node.store.files import encode_file_meta
from tests.factories import ct_dataset, new_uid

PIXEL_TAG = b"\xe0\x7f\x10\x00"
ITEM = b"\xfe\xff\x00\xe0"
SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def body(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` encoded in ``transfer_syntax``, without preamble and file meta."""
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    head = encode_file_meta(ds.file_meta)
    assert raw.startswith(head)
    return raw[len(head):]


def part10(ds: Dataset, data: bytes, transfer_syntax: str) -> bytes:
    """A Part 10 file: ``ds``'s file meta saying ``transfer_syntax``, then ``data`` as it is."""
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return encode_file_meta(ds.file_meta) + data


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    transfer_syntax: str
    reason: str  # a word the refusal's Error Comment must contain
    sop_instance_uid: str  # as in the data set, so a UID mismatch is never the reason


def _encapsulated(ds: Dataset, pixels: bytes) -> bytes:
    """``ds`` in JPEG Baseline with ``pixels`` as the raw bytes of an undefined-length Pixel Data."""
    del ds.PixelData
    head = body(ds, JPEGBaseline8Bit)
    return head + PIXEL_TAG + b"OB\x00\x00\xff\xff\xff\xff" + pixels


def malformed_cases(seed: int = 0) -> list[Case]:
    """Every malformed data set of issue #12, each with the reason it must be refused for."""
    rng = random.Random(seed)
    sop = new_uid()

    def ct() -> Dataset:
        return ct_dataset(size=64, sop=sop)

    explicit = body(ct())
    pixel_at = explicit.rindex(PIXEL_TAG)
    huge_pixels = bytearray(explicit)
    struct.pack_into("<L", huge_pixels, pixel_at + 8, 0xFFFFFFF0)
    fragment = b"\xff\xd8" + bytes(rng.randrange(256) for _ in range(100)) + b"\xff\xd9"
    items = ITEM + struct.pack("<L", 0) + ITEM + struct.pack("<L", len(fragment)) + fragment
    native_undefined = explicit[:pixel_at] + PIXEL_TAG + b"OW\x00\x00\xff\xff\xff\xff" + items
    cases = [
        ("truncated in the pixel data", explicit[:-100], ExplicitVRLittleEndian, "past the end"),
        ("truncated in an element header", explicit[:pixel_at + 5], ExplicitVRLittleEndian,
         "truncated"),
        ("trailing garbage", explicit + bytes(rng.randrange(256) for _ in range(37)),
         ExplicitVRLittleEndian, ""),  # refused for whatever the bytes happen to look like
        ("pixel data length 0xFFFFFFF0", bytes(huge_pixels), ExplicitVRLittleEndian,
         "past the end"),
        ("implicit VR bytes in explicit VR", body(ct(), ImplicitVRLittleEndian),
         ExplicitVRLittleEndian, "VR"),
        ("explicit VR bytes in implicit VR", explicit, ImplicitVRLittleEndian, "VR"),
        ("encapsulated pixel data not itemised",
         _encapsulated(ct(), fragment + SEQUENCE_END), JPEGBaseline8Bit, "itemised"),
        ("encapsulated fragment past the end",
         _encapsulated(ct(), ITEM + b"\x00\x00\x00\x00" + ITEM
                       + struct.pack("<L", 4096) + fragment + SEQUENCE_END),
         JPEGBaseline8Bit, "past the end"),
        ("encapsulated pixel data without its delimiter",
         _encapsulated(ct(), items), JPEGBaseline8Bit, "truncated"),
        ("undefined-length pixel data in a native transfer syntax", native_undefined,
         ExplicitVRLittleEndian, "native"),
        ("defined-length pixel data in an encapsulated transfer syntax",
         _encapsulated_defined(ct(), fragment), JPEGBaseline8Bit, "encapsulated"),
    ]
    return [Case(*fields, sop_instance_uid=sop) for fields in cases]


def _encapsulated_defined(ds: Dataset, fragment: bytes) -> bytes:
    del ds.PixelData
    return body(ds, JPEGBaseline8Bit) + PIXEL_TAG + b"OB\x00\x00" + struct.pack("<L", len(fragment)) + fragment


def well_formed_encapsulated(ds: Dataset, fragment: bytes) -> bytes:
    """``ds`` with one JPEG fragment, properly itemised (a control for the cases above)."""
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    return body(ds, JPEGBaseline8Bit)

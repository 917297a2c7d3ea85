"""A structural check of an encoded data set: every element header, no value loaded.

pydicom reads leniently (it guesses the VR encoding when the bytes disagree with the transfer
syntax, defers values it never reaches, and stops quietly at a short file), so a data set it
"reads" may still be one DCMTK or a PACS cannot. Before the node answers success it walks every
element header of the data set in the negotiated transfer syntax (PS3.5 7.1, 7.5, A.4) and refuses
what a strict reader would refuse: truncation, trailing bytes, a value length that runs past its
container, VR bytes that do not match the transfer syntax, tags out of order, sequences and
encapsulated pixel data that are not properly itemised. Values are skipped with ``seek``, so the
cost is per element, not per byte.

The walk also reports where File Meta Information elements (group 0002) sit in the data set, so
the store can drop them: they belong to the file's meta header, which is the node's.
"""

import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from pydicom.datadict import DicomDictionary, RepeatersDictionary
from pydicom.uid import UID

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
#: Deeper nesting than this is refused: no IOD comes close, and recursion must stay bounded.
MAX_DEPTH = 32
#: More elements than this (at every depth, items and delimiters included) are refused: a real
#: instance has a few thousand; a million empty ones (8 MiB) already cost seconds of CPU.
MAX_ELEMENTS = 1_000_000
#: Public tags whose VR is SQ, for implicit VR data sets (50xx,2600 is the one repeating one).
_SEQUENCE_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
_CURVE_SEQUENCE = 0x2600
#: VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 Table 7.1-1).
LONG_VRS = frozenset(
    b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split()
)
SHORT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split()
)


class MalformedDataSetError(ValueError):
    """The data set's bytes do not follow the encoding rules of its transfer syntax."""


@dataclass
class WalkResult:
    """What the walk found besides "well formed"."""

    #: ``(start, end)`` byte offsets (in the walked file) of top-level group 0002 elements.
    file_meta_ranges: list[tuple[int, int]] = field(default_factory=list)
    #: Their tags, as ``"(0002,0010)"``, for the audit trail.
    file_meta_tags: list[str] = field(default_factory=list)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class Encoding:
    """How element headers are encoded: implicit or explicit VR, byte order, pixel encapsulation."""

    implicit: bool
    little_endian: bool
    encapsulated: bool

    @classmethod
    def of(cls, transfer_syntax: str) -> "Encoding":
        """The encoding of a transfer syntax; unknown ones are explicit VR little endian (PS3.5 A.4)."""
        uid = UID(transfer_syntax)
        if not uid.is_transfer_syntax:
            return cls(implicit=False, little_endian=True, encapsulated=True)
        return cls(
            implicit=bool(uid.is_implicit_VR), little_endian=bool(uid.is_little_endian),
            encapsulated=bool(uid.is_encapsulated),
        )


def _public_vr(tag: int) -> str | None:
    """The dictionary VR of a public tag; ``None`` for private or unknown ones.

    A dictionary ``get``, not pydicom's ``dictionary_VR``: its miss path (a ``KeyError``, a mask
    search and a formatted message) cost about 20 us, and a peer chooses how many unknown tags it
    sends. Of the repeating groups only the curve and overlay ones (50xx, 60xx) are looked up.
    """
    group = tag >> 16
    if group & 1:  # private: no public dictionary entry
        return None
    entry = DicomDictionary.get(tag)
    if entry is not None:
        return entry[0]
    if group >> 8 in (0x50, 0x60):
        entry = RepeatersDictionary.get(f"{group >> 8:02X}xx{tag & 0xFFFF:04X}")
        return entry[0] if entry is not None else None
    return None


class _Walker:
    """Walks one data set; ``limit`` arguments are the offset no read may pass."""

    def __init__(self, fp: BinaryIO, encoding: Encoding, end: int) -> None:
        self.fp = fp
        self.encoding = encoding
        self.end = end
        order = "<" if encoding.little_endian else ">"
        self._tag = struct.Struct(order + "HH")
        self._u16 = struct.Struct(order + "H")
        self._u32 = struct.Struct(order + "L")
        self.result = WalkResult()
        self.elements = 0

    def read(self, n: int, limit: int, what: str) -> bytes:
        position = self.fp.tell()
        if position + n > limit:
            raise MalformedDataSetError(f"truncated at byte {position} ({what})")
        data = self.fp.read(n)
        if len(data) != n:
            raise MalformedDataSetError(f"truncated at byte {position} ({what})")
        return data

    def skip(self, length: int, limit: int, tag: int) -> None:
        position = self.fp.tell()
        if position + length > limit:
            raise MalformedDataSetError(
                f"{_tag_text(tag)} length {length} at byte {position} runs past the end of its "
                f"{'data set' if limit == self.end else 'item'}"
            )
        self.fp.seek(length, 1)

    def header(self, limit: int) -> tuple[int, bytes | None, int]:
        """Read one element header: tag, VR (``None`` when implicit or an item tag) and length."""
        self.elements += 1
        if self.elements > MAX_ELEMENTS:
            raise MalformedDataSetError(f"more than {MAX_ELEMENTS} elements")
        raw = self.read(8, limit, "an element header")
        group, element = self._tag.unpack_from(raw)
        tag = group << 16 | element
        if group == 0xFFFE or self.encoding.implicit:
            if self.encoding.implicit and group != 0xFFFE:
                self._check_not_explicit(tag, raw[4:6])
            return tag, None, self._u32.unpack_from(raw, 4)[0]
        vr = raw[4:6]
        if vr in LONG_VRS:
            return tag, vr, self._u32.unpack(self.read(4, limit, "an element header"))[0]
        if vr in SHORT_VRS:
            return tag, vr, self._u16.unpack_from(raw, 6)[0]
        raise MalformedDataSetError(
            f"{_tag_text(tag)} has no valid VR ({vr!r}) in explicit VR: implicit VR data?"
        )

    @staticmethod
    def _check_not_explicit(tag: int, length_bytes: bytes) -> None:
        """Refuse explicit VR bytes in an implicit VR data set: a known tag followed by its own VR.

        The first two bytes of an implicit length equal to a VR code would make an odd length of
        at least 16705 bytes for any VR that could follow, never the case for a real element.
        """
        expected = _public_vr(tag)
        if expected is None:
            return
        if length_bytes == expected.encode("ascii", "replace")[:2]:
            raise MalformedDataSetError(
                f"{_tag_text(tag)} has an explicit VR ({expected}) in implicit VR data"
            )

    def dataset(self, end: int | None, limit: int, depth: int) -> None:
        """Walk elements to ``end``, or to an item delimiter when ``end`` is ``None``."""
        if depth > MAX_DEPTH:
            raise MalformedDataSetError(f"sequences nested deeper than {MAX_DEPTH} levels")
        previous = -1
        while end is None or self.fp.tell() < end:
            start = self.fp.tell()
            tag, vr, length = self.header(limit)
            if tag == ITEM_END and end is None and depth > 0:
                if length != 0:
                    raise MalformedDataSetError(f"item delimiter at byte {start} has length {length}")
                return
            if tag >> 16 == 0xFFFE:
                raise MalformedDataSetError(f"unexpected {_tag_text(tag)} at byte {start}")
            if tag == previous:  # readers disagree on which copy counts (DCMTK: the first)
                raise MalformedDataSetError(f"{_tag_text(tag)} at byte {start} repeated")
            if tag < previous:
                raise MalformedDataSetError(
                    f"{_tag_text(tag)} at byte {start} out of order (after {_tag_text(previous)}): "
                    "trailing or misplaced bytes?"
                )
            previous = tag
            self.value(tag, vr, length, limit, depth)
            if depth == 0 and tag >> 16 == 0x0002:
                self.result.file_meta_ranges.append((start, self.fp.tell()))
                self.result.file_meta_tags.append(_tag_text(tag))
        if self.fp.tell() != end:
            raise MalformedDataSetError(f"an element runs past the end of its item at byte {end}")

    def value(self, tag: int, vr: bytes | None, length: int, limit: int, depth: int) -> None:
        if length == UNDEFINED:
            self.undefined_length(tag, vr, limit, depth)
            return
        if tag == PIXEL_DATA and depth == 0 and self.encoding.encapsulated:
            raise MalformedDataSetError(
                "Pixel Data has a defined length in an encapsulated transfer syntax (PS3.5 A.4)"
            )
        end = self.fp.tell() + length
        if end > limit:
            self.skip(length, limit, tag)  # raises, naming the element
        if vr == b"SQ" or (vr is None and self._dictionary_sq(tag)):
            self.sequence(end, end, depth + 1)
        else:
            self.fp.seek(length, 1)

    @staticmethod
    def _dictionary_sq(tag: int) -> bool:
        return tag in _SEQUENCE_TAGS or (tag >> 24 == 0x50 and tag & 0xFFFF == _CURVE_SEQUENCE)

    def undefined_length(self, tag: int, vr: bytes | None, limit: int, depth: int) -> None:
        if tag == PIXEL_DATA:
            if not self.encoding.encapsulated:
                raise MalformedDataSetError(
                    "Pixel Data has an undefined length in a native transfer syntax"
                )
            self.fragments(limit)
        elif vr is None or vr == b"SQ":
            self.sequence(None, limit, depth + 1)
        elif vr == b"UN":
            # An undefined-length UN holds a sequence encoded in implicit VR little endian (PS3.5 6.2.2)
            inner = _Walker(self.fp, Encoding(implicit=True, little_endian=True, encapsulated=False),
                            self.end)
            inner.sequence(None, limit, depth + 1)
        else:
            raise MalformedDataSetError(
                f"{_tag_text(tag)} of VR {vr.decode('latin-1')} has an undefined length")

    def sequence(self, end: int | None, limit: int, depth: int) -> None:
        """Walk the items of a sequence to ``end``, or to its delimiter when ``end`` is ``None``."""
        while end is None or self.fp.tell() < end:
            start = self.fp.tell()
            tag, _, length = self.header(limit)
            if tag == SEQUENCE_END and end is None:
                if length != 0:
                    raise MalformedDataSetError(f"sequence delimiter at byte {start} has length {length}")
                return
            if tag != ITEM:
                raise MalformedDataSetError(f"expected an item at byte {start}, found {_tag_text(tag)}")
            if length == UNDEFINED:
                self.dataset(None, limit, depth)
            else:
                item_end = self.fp.tell() + length
                if item_end > limit:
                    self.skip(length, limit, tag)  # raises
                self.dataset(item_end, item_end, depth)
        if self.fp.tell() != end:
            raise MalformedDataSetError(f"an item runs past the end of its sequence at byte {end}")

    def fragments(self, limit: int) -> None:
        """Encapsulated pixel data: a Basic Offset Table item, fragments, a delimiter (PS3.5 A.4)."""
        items = 0
        while True:
            start = self.fp.tell()
            raw = self.read(8, limit, "an encapsulated pixel data item")
            group, element = struct.unpack_from("<HH", raw)
            tag = group << 16 | element
            (length,) = struct.unpack_from("<L", raw, 4)
            if tag == SEQUENCE_END and items > 0:
                if length != 0:
                    raise MalformedDataSetError(f"sequence delimiter at byte {start} has length {length}")
                return
            if tag != ITEM or length == UNDEFINED:
                raise MalformedDataSetError(
                    f"encapsulated Pixel Data not itemised: {_tag_text(tag)} length {length:#x} "
                    f"at byte {start}, expected a defined-length item"
                    f"{'' if items == 0 else ' or a sequence delimiter'}"
                )
            self.skip(length, limit, PIXEL_DATA)
            items += 1


def walk(fp: BinaryIO, start: int, end: int, transfer_syntax: str) -> WalkResult:
    """Check the data set in ``fp[start:end]`` against the encoding of ``transfer_syntax``.

    Parameters
    ----------
    fp
        A seekable binary file; only element headers are read.
    start, end
        The byte offsets of the data set in ``fp``.
    transfer_syntax
        The transfer syntax the data set was negotiated in (not deflated: inflate first).

    Raises
    ------
    MalformedDataSetError
        Naming the first problem found and its byte offset.
    """
    walker = _Walker(fp, Encoding.of(transfer_syntax), end)
    fp.seek(start)
    walker.dataset(end, end, 0)
    return walker.result

"""Instance files on disk: UID checks, header parsing and atomic, fsync'd writes.

An instance lives at ``<data_dir>/instances/<study>/<series>/<sop>.dcm``. It is first written to
``<data_dir>/tmp/`` (same file system), flushed to disk, then renamed into place and its folder
flushed, so a reader sees the whole old file or the whole new one, never a part.
"""

import io
import os
import re
import threading
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.errors import ConfigError, PermanentError
from dicom_node.store.keys import KEY_TAGS, key_values

# A UID is 1..64 characters of digits in dot-separated components (PS3.5 9.1). Components with
# leading zeros are not valid DICOM but are seen from real equipment; they are still path-safe.
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_PREAMBLE = b"\x00" * 128 + b"DICM"
HEADER_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "Modality", "BodyPartExamined", "SeriesDescription", "Manufacturer",
)


class InvalidInstanceError(PermanentError):
    """The bytes a peer sent are not an instance the node can store.

    ``kind`` is ``"unparseable"`` or ``"uid"``; ingest maps it to a DIMSE status.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class InflationLimitError(InvalidInstanceError):
    """A deflated data set inflates to more than the bytes it was allowed."""


def check_uid(name: str, value: object) -> str:
    """Return ``value`` if it is a UID that is safe to use as a path component.

    Raises
    ------
    InvalidInstanceError
        Naming the attribute and the value, if it is missing, longer than 64 characters or not
        digits and dots.
    """
    if value is None or value == "":
        raise InvalidInstanceError("uid", f"{name} is missing")
    text = str(value)
    if len(text) > 64 or not _UID_RE.fullmatch(text):
        raise InvalidInstanceError("uid", f"{name} {text[:80]!r} is not a valid UID")
    return text


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes the store indexes and routing needs, read from an instance's header."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    body_part_examined: str = ""
    series_description: str = ""
    manufacturer: str = ""
    source_ae_title: str = ""  # (0002,0016) of the file meta: the peer that sent it
    #: The query keys' column values (:func:`dicom_node.store.keys.key_values`), as pairs.
    keys: tuple[tuple[str, object], ...] = ()


def read_header(fp: BinaryIO | Path, file_meta: FileMetaDataset | None = None) -> InstanceHeader:
    """Parse the header of a Part 10 file (pixel data is not read) and check its UIDs. With
    ``file_meta``, ``fp`` holds the data set alone, in Explicit VR Little Endian (an inflated
    deflated data set), and the meta is the one given.

    Raises
    ------
    InvalidInstanceError
        If the file does not parse or a UID is missing or malformed.
    """
    try:
        ds = dcmread(fp, stop_before_pixels=True, specific_tags=list({*HEADER_TAGS, *KEY_TAGS}),
                     force=file_meta is not None)
        meta = file_meta if file_meta is not None else ds.file_meta
        transfer_syntax = meta.TransferSyntaxUID
        source_ae = meta.get("SourceApplicationEntityTitle", "")
        values = {tag: ds.get(tag, "") for tag in HEADER_TAGS}
        keys = tuple(key_values(ds).items())
    except InvalidDicomError as exc:
        raise InvalidInstanceError("unparseable", f"not a DICOM data set: {exc}") from None
    except Exception as exc:  # pydicom raises many types on malformed input; all mean the same
        raise InvalidInstanceError("unparseable", f"data set does not parse: {exc}") from None

    def text(value: object) -> str:
        return str(value).strip() if value is not None else ""

    return InstanceHeader(
        sop_class_uid=check_uid("SOPClassUID", values["SOPClassUID"]),
        sop_instance_uid=check_uid("SOPInstanceUID", values["SOPInstanceUID"]),
        study_instance_uid=check_uid("StudyInstanceUID", values["StudyInstanceUID"]),
        series_instance_uid=check_uid("SeriesInstanceUID", values["SeriesInstanceUID"]),
        transfer_syntax_uid=check_uid("TransferSyntaxUID", transfer_syntax),
        modality=text(values["Modality"]),
        body_part_examined=text(values["BodyPartExamined"]),
        series_description=text(values["SeriesDescription"]),
        manufacturer=text(values["Manufacturer"]),
        source_ae_title=text(source_ae),
        keys=keys,
    )


_DEFLATE_TRAILER_MAX = 8
_CHUNK = 2**20  # copy in 1 MiB chunks: large data sets never sit in memory whole


def chunks(
    fp: BinaryIO, start: int, end: int, skip: Iterable[tuple[int, int]] = ()
) -> Iterator[bytes | memoryview]:
    """The bytes of ``fp[start:end]`` in bounded chunks, leaving out the ``skip`` ranges."""
    if isinstance(fp, io.BytesIO):  # already in memory: slices of it, not copies
        with fp.getbuffer() as view:
            for cut_start, cut_end in _kept(start, end, skip):
                yield view[cut_start:cut_end]
        return
    for cut_start, cut_end in _kept(start, end, skip):
        fp.seek(cut_start)
        position = cut_start
        while position < cut_end:
            data = fp.read(min(_CHUNK, cut_end - position))
            if not data:
                raise InvalidInstanceError("unparseable", "data set shorter than announced")
            position += len(data)
            yield data


def _kept(start: int, end: int, skip: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The ranges of ``[start, end)`` outside the ``skip`` ranges."""
    position = start
    for cut_start, cut_end in [*sorted(skip), (end, end)]:
        if position < cut_start:
            yield position, cut_start
        position = max(position, cut_end)


def inflate(fp: BinaryIO, start: int, end: int, target: BinaryIO, limit: int) -> int:
    """Inflate the deflated data set ``fp[start:end]`` (PS3.5 A.5) into ``target``; its length.

    Raises
    ------
    InvalidInstanceError
        If it is not a raw deflate stream, is cut short, is followed by other bytes, or inflates
        to more than ``limit`` bytes (a few KiB of deflate can announce gigabytes).
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written = 0
    try:
        for data in chunks(fp, start, end):
            while data:
                out = inflater.decompress(data, limit + 1 - written)
                written += target.write(out)
                if written > limit:
                    raise InflationLimitError(
                        "unparseable", f"deflated data set inflates to more than {limit} bytes")
                data = inflater.unconsumed_tail
        written += target.write(inflater.flush())
    except zlib.error as exc:
        raise InvalidInstanceError("unparseable", f"deflated data set does not inflate: {exc}") from None
    # Writers add a padding byte (even length) or a gzip trailer (8 bytes: CRC-32 and size)
    # after the stream, which readers ignore; more than that is not a deflated data set.
    if not inflater.eof or len(inflater.unused_data) > _DEFLATE_TRAILER_MAX:
        raise InvalidInstanceError("unparseable", "deflated data set is truncated or has trailing bytes")
    return written


def relative_path(header: InstanceHeader) -> Path:
    """Where an instance lives below ``<data_dir>/instances``."""
    return Path(
        header.study_instance_uid, header.series_instance_uid, f"{header.sop_instance_uid}.dcm"
    )


def encode_file_meta(file_meta: FileMetaDataset) -> bytes:
    """The preamble, ``DICM`` prefix and File Meta Information group of a Part 10 file."""
    buffer = io.BytesIO()
    buffer.write(_PREAMBLE)
    write_file_meta_info(buffer, file_meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileArea:
    """The folders under ``data_dir`` that hold instance files and their temporary files."""

    def __init__(self, data_dir: Path) -> None:
        self.instances = data_dir / "instances"
        self.tmp = data_dir / "tmp"
        # Serialises folder creation: a thread must not use a folder another thread created
        # before that thread has flushed the folder's entry in its parent.
        self._dirs_lock = threading.Lock()
        self.instances.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def write_temporary(self, parts: Iterable[bytes | memoryview]) -> Path:
        """Write ``parts`` to a new temporary file, flushed to disk, and return its path.

        ``parts`` may be a generator that raises (a data set shorter than announced): the
        temporary file is then removed.
        """
        path = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with path.open("xb") as fh:
                for part in parts:
                    fh.write(part)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def commit(self, temporary: Path, relative: Path) -> Path:
        """Rename a flushed temporary file to ``instances/relative`` atomically, durably."""
        target = self.instances / relative
        self._make_dirs(target.parent)
        try:
            os.replace(temporary, target)
        except FileNotFoundError:
            # the retention purge removed the folder, empty, between its creation and this rename
            self._make_dirs(target.parent)
            os.replace(temporary, target)
        fsync_dir(target.parent)
        return target

    def _make_dirs(self, folder: Path) -> None:
        with self._dirs_lock:
            missing = []
            while not folder.exists():
                missing.append(folder)
                folder = folder.parent
            for new in reversed(missing):
                new.mkdir(exist_ok=True)
                fsync_dir(new.parent)

    def remove_temporaries(self) -> int:
        """Delete temporary files left by a process that died mid-write; return how many."""
        removed = 0
        for path in self.tmp.glob("*.part"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def exists(self, relative: Path) -> bool:
        return (self.instances / relative).is_file()

    def unlink(self, relative: Path) -> None:
        """Remove an instance file and flush its folder."""
        target = self.instances / relative
        target.unlink(missing_ok=True)
        fsync_dir(target.parent)

    def remove_empty_dirs(self, relative: Path) -> None:
        """Remove the series and study folders of ``relative`` (an instance's path) if empty.

        Under the folder lock, so no folder goes while another thread creates it; a rename into a
        folder removed after its creation is retried by :meth:`commit`.
        """
        with self._dirs_lock:
            for folder in (self.instances / relative).parents:
                if folder == self.instances or self.instances not in folder.parents:
                    return
                try:
                    folder.rmdir()
                except FileNotFoundError:
                    continue
                except OSError:  # not empty: neither it nor its parent goes
                    return
                fsync_dir(folder.parent)


def input_files(inputs: Sequence[Path]) -> Iterator[Path]:
    """The files a user named on the command line: each file, and every file under each folder
    (sorted); ConfigError for a path that does not exist."""
    for item in inputs:
        if item.is_dir():
            yield from sorted(p for p in item.rglob("*") if p.is_file())
        elif item.is_file():
            yield item
        else:
            raise ConfigError(f"{item}: no such file or folder")


def add_file_meta(ds: Dataset) -> None:
    """File Meta Information for ``ds`` in Explicit VR Little Endian, naming this implementation."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

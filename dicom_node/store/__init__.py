"""The instance store: files on disk plus their SQLite index.

An instance is stored in two steps so the caller can check it in between:
:meth:`InstanceStore.stage` writes the received bytes to a temporary file, flushed to disk, and
parses the header; :meth:`InstanceStore.commit` renames it into place, flushes the folder and
indexes it. Only after ``commit`` returns may a peer be told "success".

The files are the record of truth; the index can be rebuilt from them. That is why the index runs
with ``synchronous=NORMAL`` (a commit survives a process crash, not necessarily a power cut):
after any stop that was not clean, :meth:`InstanceStore.recover` indexes every file the index
lacks. A clean stop leaves a marker so the next start skips that scan.
"""

import dataclasses
import errno
import io
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID

from dicom_node.audit import NO_AUDIT, Audit
from dicom_node.errors import RetryableError
from dicom_node.store.db import DATABASE_NAME
from dicom_node.store.files import (
    FileArea,
    InflationLimitError,
    InstanceHeader,
    InvalidInstanceError,
    check_uid,
    chunks,
    encode_file_meta,
    fsync_dir,
    inflate,
    read_header,
    relative_path,
)
from dicom_node.store.index import Index, Indexed, InstanceRecord, SeriesKey, SeriesRecord
from dicom_node.store.keys import KEY_TAGS, key_values
from dicom_node.store.results import ResultArea, ResultFile
from dicom_node.store.walk import MalformedDataSetError, WalkResult, walk

__all__ = [
    "InstanceHeader", "InstanceRecord", "InstanceStore", "InvalidInstanceError", "OutOfSpaceError",
    "SeriesKey", "SeriesRecord", "StagedInstance", "StorageError", "check_uid",
]

logger = logging.getLogger(__name__)


class StorageError(RetryableError):
    """The store could not write (I/O error); the peer may send again later."""


class OutOfSpaceError(StorageError):
    """Free space is below the configured floor, or the disk filled up while writing."""


@dataclass(frozen=True)
class StagedInstance:
    """A received instance written to a temporary file, not yet durable or indexed."""

    header: InstanceHeader
    temporary: Path
    size_bytes: int
    #: Tags of File Meta Information elements (group 0002) found in the data set and left out.
    stripped_tags: tuple[str, ...] = ()


class InstanceStore:
    """Durable storage of received instances under ``data_dir``.

    Parameters
    ----------
    data_dir
        The node's data folder; ``instances/``, ``tmp/`` and ``index.sqlite`` live in it.
    min_free_space
        Bytes that must stay free on the data folder's file system after a write.
    clock
        Returns the current time as seconds since the epoch (injectable for tests).
    audit
        Where events about stored data go (a Series Instance UID seen under several studies).
    """

    def __init__(
        self, data_dir: Path, min_free_space: int = 0, clock: Callable[[], float] = time.time,
        audit: Audit = NO_AUDIT,
    ) -> None:
        self.data_dir = data_dir
        self.min_free_space = min_free_space
        self.clock = clock
        self.audit = audit
        self.files = FileArea(data_dir)
        self.index = Index(data_dir / DATABASE_NAME, synchronous="NORMAL")
        self._clean_marker = data_dir / "clean-shutdown"
        self._uid_locks = [threading.Lock() for _ in range(64)]
        #: Set when files and index may disagree; the next start then checks every file.
        self.needs_scan = False

    def close(self, clean_shutdown: bool = False) -> None:
        """Close the index; ``clean_shutdown`` (only from the process that ran :meth:`recover`)
        records that nothing was in flight, so the next start need not scan the files."""
        self.index.close()
        if clean_shutdown and not self.needs_scan:
            self._clean_marker.touch()
            fsync_dir(self.data_dir)

    def stage(
        self, file_meta: FileMetaDataset, dataset: BinaryIO | bytes | memoryview,
        max_inflated_size: int = 2**31, start: int = 0,
    ) -> StagedInstance:
        """Check a received data set, write it and its file meta to a temporary file, parse it.

        Every element header of the data set is checked against the transfer syntax of
        ``file_meta`` first (:func:`dicom_node.store.walk.walk`); group 0002 elements in the data
        set are left out, so the file's meta, the node's, is the only one a reader sees.

        Parameters
        ----------
        file_meta
            The node's File Meta Information for the instance (negotiated transfer syntax).
        dataset
            The data set as received: bytes, or a seekable binary file (a spooled data set).
        max_inflated_size
            Bytes a deflated data set may inflate to.
        start
            Where the data set begins in ``dataset`` (after a Part 10 file's preamble and meta,
            for STOW-RS, which receives whole files).

        Raises
        ------
        OutOfSpaceError
            If the write would leave less than ``min_free_space`` free.
        InvalidInstanceError
            If the data set is malformed, does not parse, or its UIDs are missing or malformed;
            nothing stays on disk.
        """
        fp = io.BytesIO(dataset) if isinstance(dataset, (bytes, memoryview)) else dataset
        length = fp.seek(0, os.SEEK_END)
        found, inflated_header = self._check(fp, start, length, file_meta, max_inflated_size)
        cut = found.file_meta_ranges
        head = encode_file_meta(file_meta)
        size = len(head) + length - start - sum(end - begin for begin, end in cut)
        free = shutil.disk_usage(self.data_dir).free
        if free - size < self.min_free_space:
            raise OutOfSpaceError(
                f"free space {free // 2**20} MiB is below the floor of "
                f"{self.min_free_space // 2**20} MiB"
            )
        temporary = self._write(head, fp, start, length, cut)
        try:
            header = inflated_header or read_header(temporary)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return StagedInstance(header, temporary, size, tuple(found.file_meta_tags))

    def _check(self, fp: BinaryIO, start: int, length: int, file_meta: FileMetaDataset,
               max_inflated: int) -> tuple[WalkResult, InstanceHeader | None]:
        """Walk the data set; a deflated one is inflated to a scratch file under ``tmp/`` first,
        and its header read from there (pydicom would inflate it again, whole, in memory)."""
        transfer_syntax = str(file_meta.TransferSyntaxUID)
        header = None
        try:
            if not UID(transfer_syntax).is_deflated:
                return walk(fp, start, length, transfer_syntax), None
            # The scratch file counts against the free-space floor too: a few KiB of deflate
            # could otherwise fill the disk before the floor is checked.
            room = max(0, shutil.disk_usage(self.data_dir).free - self.min_free_space)
            with tempfile.TemporaryFile(dir=self.files.tmp) as inflated:
                try:
                    size = inflate(fp, start, length, inflated, min(max_inflated, room))
                except InflationLimitError:
                    if room < max_inflated:
                        raise OutOfSpaceError(
                            f"deflated data set inflates past the free space above the floor of "
                            f"{self.min_free_space // 2**20} MiB") from None
                    raise
                found = walk(inflated, 0, size, transfer_syntax)
                inflated.seek(0)
                header = read_header(inflated, file_meta)
        except MalformedDataSetError as exc:
            raise InvalidInstanceError("unparseable", str(exc)) from None
        if found.file_meta_ranges:
            # Leaving them out would mean deflating again; a peer that sends them is refused.
            raise InvalidInstanceError(
                "unparseable", "File Meta Information (group 0002) inside a deflated data set"
            )
        return found, header

    def _write(self, head: bytes, fp: BinaryIO, start: int, length: int,
               cut: list[tuple[int, int]]) -> Path:
        try:
            return self.files.write_temporary(itertools.chain((head,), chunks(fp, start, length, cut)))
        except OSError as exc:
            raise _write_error(exc) from exc

    def discard(self, staged: StagedInstance) -> None:
        """Remove a staged instance that will not be committed."""
        staged.temporary.unlink(missing_ok=True)

    def commit(self, staged: StagedInstance, calling_ae_title: str) -> InstanceRecord:
        """Make a staged instance durable and indexed; replaces an earlier copy of the same UID.

        Raises
        ------
        StorageError
            If the file could not be put in place or indexed. A file already in place stays
            (it is complete and flushed) and is indexed by :meth:`recover` at the next start.
        """
        header = staged.header
        relative = relative_path(header)
        with self._uid_lock(header.sop_instance_uid):
            try:
                self.files.commit(staged.temporary, relative)
            except OSError as exc:
                self.discard(staged)
                raise _write_error(exc) from exc
            record = _record(header, calling_ae_title, staged.size_bytes, relative, 0.0)
            try:
                indexed = self.index.put(record, header.manufacturer, clock=self.clock,
                                         keys=dict(header.keys))
            except Exception as exc:
                self.needs_scan = True
                logger.error("index commit failed for %s: %s", header.sop_instance_uid, exc)
                raise StorageError(f"cannot index instance: {exc}") from exc
            self._after_put(indexed)
        return indexed.record

    def _after_put(self, indexed: Indexed) -> None:
        """Remove the copy a moved instance left behind; report a Series Instance UID that a
        second study uses (it stays a series of its own: the index keys series by study too)."""
        old, record = indexed.replaced, indexed.record
        if old is not None and old.path != record.path:
            # Same SOP Instance UID under another study or series: the new copy wins.
            self.files.unlink(Path(old.path))
            if old.study_instance_uid != record.study_instance_uid:
                self.audit.record("instance_moved_to_another_study", sop_instance_uid=record.sop_instance_uid,
                                  study_instance_uid=record.study_instance_uid,
                                  previous_study_instance_uid=old.study_instance_uid,
                                  series_instance_uid=record.series_instance_uid,
                                  previous_series_instance_uid=old.series_instance_uid)
        others = indexed.other_studies
        if others:
            logger.warning("series %s arrived in study %s but is also in study(ies) %s; each study's "
                           "series is processed on its own", record.series_instance_uid,
                           record.study_instance_uid, ", ".join(others))
            self.audit.record("series_uid_in_several_studies", study_instance_uid=record.study_instance_uid,
                              series_instance_uid=record.series_instance_uid,
                              other_study_instance_uids=list(indexed.other_studies))

    def _uid_lock(self, sop_instance_uid: str) -> threading.Lock:
        """One of a fixed set of locks, chosen by UID: the same UID never commits twice at once."""
        return self._uid_locks[hash(sop_instance_uid) % len(self._uid_locks)]

    def remove(self, record: InstanceRecord, resuming: bool = False) -> bool:
        """Delete an instance as the index holds it: the record, then the file, then its folders
        if empty (the retention purge). False, and nothing changes, if the instance was received
        again since ``record`` was read: the new copy stays.

        A crash between the index commit and the unlink leaves a file the index lacks; the purge
        records its intent first (:mod:`dicom_node.retention`) and, ``resuming`` it at the next
        start, removes such a file when no record of its UID names its path.
        """
        relative = Path(record.path)
        with self._uid_lock(record.sop_instance_uid):
            if not self.index.remove(record):
                current = self.index.get(record.sop_instance_uid)
                if not resuming or (current is not None and current.path == record.path):
                    return False
                if not self.files.exists(relative):  # the interrupted purge had removed it too
                    self.files.remove_empty_dirs(relative)
                    return True
            self.files.unlink(relative)
            self.files.remove_empty_dirs(relative)
        return True

    def save_result(self, ds: Dataset) -> Path:
        """Write a result the node made under ``results/`` (atomically, :class:`ResultArea`),
        then index its query keys, so that C-FIND finds results as it finds inputs.

        A crash between the two leaves a file the next start's :meth:`recover` indexes; so does a
        failed index commit (it raises :class:`StorageError` and marks the store for that scan).
        """
        with self._uid_lock(str(ds.SOPInstanceUID)):
            path = ResultArea(self.data_dir / "results").save(ds)
            try:
                self.index.put_result(str(path.relative_to(self.data_dir)),
                                      str(ds.file_meta.TransferSyntaxUID), self.clock(), key_values(ds))
            except Exception as exc:
                self.needs_scan = True
                logger.error("index commit failed for result %s: %s", ds.SOPInstanceUID, type(exc).__name__)
                raise StorageError(f"cannot index result: {exc}") from exc
        return path

    def remove_result(self, found: ResultFile) -> bool:
        """Delete a result (the retention purge): its file, if it is still the copy ``found``
        (not one a re-run wrote since), then its index record. True if it is gone, now or by an
        earlier, interrupted call; False, and nothing changes, if a newer copy is in place.

        The file goes first: a crash in between leaves a record whose file is missing, which
        :meth:`recover` drops; the other order would leave a file that ``recover`` indexes
        again. A failed index commit marks the store for that check at the next start.
        """
        relative = str(found.path.relative_to(self.data_dir)) if found.path.is_absolute() else str(found.path)
        with self._uid_lock(found.sop_instance_uid):
            absolute = self.data_dir / relative
            removed = ResultArea(self.data_dir / "results").remove(
                dataclasses.replace(found, path=absolute))
            if not removed and absolute.exists():
                return False
            try:
                self.index.remove_result(found.sop_instance_uid, relative)
            except Exception:
                self.needs_scan = True
                raise
        return True

    def path_of(self, record: InstanceRecord) -> Path:
        """The absolute path of an indexed instance."""
        return self.files.instances / record.path

    def recover(self) -> None:
        """Bring files and index back in step after a crash; call once at start-up.

        Temporary files of interrupted writes are deleted (their peers never got success).
        Unless the last stop was clean, every file is checked: one that reached its final place
        but not the index (crash or power cut around the index commit) is indexed; if its UID is
        indexed elsewhere, the newer file wins.
        """
        removed = self.files.remove_temporaries()
        if removed:
            logger.info("removed %d temporary file(s) of interrupted writes", removed)
        if self._clean_marker.exists():
            self._clean_marker.unlink()
            fsync_dir(self.data_dir)
            return
        logger.info("checking the index against the files (first start, or the last stop was not clean)")
        indexed = dict(self.index.paths())
        for path in self.files.instances.rglob("*.dcm"):
            relative = str(path.relative_to(self.files.instances))
            if relative not in indexed:
                self._recover_file(path, Path(relative))
        self._recover_results()

    def _recover_results(self) -> None:
        """Index the result files a crash left unindexed (written, not yet indexed); drop the
        records of result files that are gone (a purge interrupted between file and record)."""
        indexed = set()
        for relative, sop_instance_uid in self.index.results():
            if (self.data_dir / relative).exists():
                indexed.add(relative)
            elif self.index.remove_result(sop_instance_uid, relative):
                logger.info("dropped the record of result %s: its file is gone", sop_instance_uid)
        for path in sorted((self.data_dir / "results").glob("*/*/*.dcm")):
            relative = str(path.relative_to(self.data_dir))
            if relative in indexed:
                continue
            try:
                ds = dcmread(path, stop_before_pixels=True, specific_tags=list(KEY_TAGS))
                syntax = str(ds.file_meta.TransferSyntaxUID)
            except Exception as exc:  # pydicom raises many types on a damaged file
                logger.warning("ignoring unreadable result file %s: %s", relative, type(exc).__name__)
                continue
            self.index.put_result(relative, syntax, path.stat().st_mtime, key_values(ds))
            logger.info("indexed result %s, written before an interrupted index commit",
                        ds.get("SOPInstanceUID"))

    def _recover_file(self, path: Path, relative: Path) -> None:
        try:
            header = read_header(path)
        except InvalidInstanceError as exc:
            logger.warning("ignoring unreadable file %s: %s", relative, exc)
            return
        mtime = path.stat().st_mtime
        old = self.index.get(header.sop_instance_uid)
        if old is not None and old.received_at >= mtime:
            logger.info("removing superseded copy of %s", header.sop_instance_uid)
            self.files.unlink(relative)
            return
        record = _record(header, header.source_ae_title, path.stat().st_size, relative, mtime)
        self._after_put(self.index.put(record, header.manufacturer, keys=dict(header.keys)))
        logger.info("indexed %s, written before an interrupted index commit", header.sop_instance_uid)


def _write_error(exc: OSError) -> StorageError:
    """The store's error for a failed write: out of space for a full disk, else a storage error."""
    if exc.errno == errno.ENOSPC:
        return OutOfSpaceError("disk full while writing")
    return StorageError(f"cannot write instance: {exc.strerror}")


def _record(
    header: InstanceHeader, calling_ae_title: str, size: int, relative: Path, now: float
) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        series_instance_uid=header.series_instance_uid,
        study_instance_uid=header.study_instance_uid,
        transfer_syntax_uid=header.transfer_syntax_uid,
        modality=header.modality,
        body_part_examined=header.body_part_examined,
        series_description=header.series_description,
        calling_ae_title=calling_ae_title,
        size_bytes=size,
        path=os.fspath(relative),
        received_at=now,
    )

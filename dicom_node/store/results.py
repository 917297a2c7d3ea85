"""The node's own outputs on disk: ``<root>/<study>/<series>/<instance>.dcm``, written atomically
(``root`` is ``data_dir/results`` in the node, ``--out`` for ``dicom-node explain``).

A re-run derives the same UIDs (dicom_node.encode), so it replaces its earlier files.
"""

import contextlib
import io
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.store.files import check_uid, fsync_dir


@dataclass(frozen=True)
class ResultFile:
    """One result file as found on disk; ``identity`` tells it from a later copy of the same UID
    (a re-run writes a new file, renamed over the old one)."""

    path: Path
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    written_at: float  # the file's modification time, seconds since the epoch
    size_bytes: int
    identity: tuple[int, int]  # (inode, modification time in ns)


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_ino, stat.st_mtime_ns


class ResultArea:
    """Where encoded results wait for export."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def remove_temporaries(self) -> int:
        """Delete the temporary files of writes a crash interrupted; returns how many."""
        leftovers = list(self.root.glob("*/*/.*.part"))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def path_of(self, ds: Dataset) -> Path:
        parts = [check_uid(name, ds.get(keyword)) for name, keyword in (
            ("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"), ("instance", "SOPInstanceUID"))]
        return self.root.joinpath(*parts[:2], f"{parts[2]}.dcm")

    def save(self, ds: Dataset) -> Path:
        """Write ``ds`` as a DICOM file (temporary file, fsync, rename, folder fsync)."""
        target = self.path_of(ds)
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        ds.ensure_file_meta()
        ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.save_as(buffer, enforce_file_format=True)
        temporary = target.parent / f".{uuid.uuid4().hex}.part"
        try:
            try:
                fh = temporary.open("xb")
            except FileNotFoundError:
                # the retention purge removed the folder, empty, between its creation and this
                # open (as FileArea.commit retries its rename); once the temporary file is in
                # it, the folder is not empty and stays
                target.parent.mkdir(parents=True, exist_ok=True)
                fh = temporary.open("xb")
            with fh:
                fh.write(buffer.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return target

    def files(self) -> Iterator[ResultFile]:
        """Every result file (``<study>/<series>/<uid>.dcm``); files that vanish meanwhile are skipped."""
        for path in self.root.glob("*/*/*.dcm"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            yield ResultFile(path, path.parent.parent.name, path.parent.name, path.stem, stat.st_mtime,
                             stat.st_size, _identity(stat))

    def remove(self, found: ResultFile) -> bool:
        """Delete a result file if it is still the one ``found`` (not a copy a re-run wrote since),
        flush its folder and remove the folders left empty; False if it was not removed."""
        try:
            if _identity(found.path.stat()) != found.identity:
                return False
            found.path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(found.path.parent)
        for folder in (found.path.parent, found.path.parent.parent):
            # a job writing into it now recreates it (``save`` makes its folders first)
            with contextlib.suppress(OSError):
                folder.rmdir()
                fsync_dir(folder.parent)
        return True

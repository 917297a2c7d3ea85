"""The node's own outputs on disk: ``<root>/<study>/<series>/<instance>.dcm``, written atomically
(``root`` is ``data_dir/results`` in the node, ``--out`` for ``dicom-node explain``).

A re-run derives the same UIDs (dicom_node.encode), so it replaces its earlier files.
"""

import io
import os
import uuid
from pathlib import Path

from pydicom import Dataset

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.store.files import check_uid, fsync_dir


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
            with temporary.open("xb") as fh:
                fh.write(buffer.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return target

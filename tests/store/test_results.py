"""The result area: a result written while the retention purge empties its folder."""

import uuid
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.store.results import ResultArea
from tests.factories import ct_dataset, new_uid


def test_a_save_survives_the_purge_removing_its_new_empty_folder(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    area = ResultArea(tmp_path / "results")
    ds = ct_dataset(new_uid(), new_uid())
    folder = area.path_of(ds).parent
    real = uuid.uuid4
    removed = []

    def purge_between(*args: object) -> uuid.UUID:
        # save made the folder; the purge, finding it empty, removes it before the file is opened
        if not removed:
            folder.rmdir()
            removed.append(folder)
        return real()

    monkeypatch.setattr(uuid, "uuid4", purge_between)
    path = area.save(ds)
    assert removed and path.is_file() and dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert [p.name for p in folder.iterdir()] == [path.name]  # no temporary file left

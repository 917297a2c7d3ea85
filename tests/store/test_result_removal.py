"""A result's index record follows its file: the purge removes both (file first), ``recover``
drops the record of a file that is gone, and a failed index commit of a new result marks the
store for the next start's scan."""

import sqlite3
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_node.store import InstanceStore, StorageError
from dicom_node.store.results import ResultArea
from tests.store.test_keys_migration import keys_of, radiograph


def _saved(store: InstanceStore, seed: int) -> tuple[str, Path]:
    ds = radiograph(seed, generate_uid(), f"R{seed}")
    return str(ds.SOPInstanceUID), store.save_result(ds)


def test_remove_result_deletes_the_file_and_its_record_and_keeps_a_newer_copy(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    store = InstanceStore(data_dir)
    try:
        uid, path = _saved(store, 1)
        other, _ = _saved(store, 2)
        [found] = [f for f in ResultArea(data_dir / "results").files() if f.sop_instance_uid == uid]
        assert store.remove_result(found)
        assert not path.exists() and set(keys_of(data_dir)) == {other}
        assert store.remove_result(found)  # again (a resumed purge): already gone, still True
        # a re-run wrote a new copy since the purge read it: file and record stay
        ds = radiograph(3, generate_uid(), "R3")
        store.save_result(ds)
        [stale] = [f for f in ResultArea(data_dir / "results").files() if f.sop_instance_uid == ds.SOPInstanceUID]
        newer = store.save_result(ds)
        assert not store.remove_result(stale)
        assert newer.exists() and ds.SOPInstanceUID in keys_of(data_dir)
    finally:
        store.close()


def test_recover_drops_the_record_of_a_result_whose_file_is_gone(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    store = InstanceStore(data_dir)
    _, path = _saved(store, 4)
    kept, _ = _saved(store, 5)
    store.close()  # not a clean stop: the next start scans
    path.unlink()  # a purge killed between the file and the record
    store = InstanceStore(data_dir)
    try:
        store.recover()
        assert set(keys_of(data_dir)) == {kept}
    finally:
        store.close()


def test_a_failed_result_index_commit_marks_the_store_for_a_scan(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    store = InstanceStore(data_dir)
    ds = radiograph(6, generate_uid(), "R6")

    def fail(*args: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    store.index.put_result = fail  # type: ignore[method-assign]
    try:
        with pytest.raises(StorageError):
            store.save_result(ds)
        assert store.needs_scan
    finally:
        store.close(clean_shutdown=True)
    assert not (data_dir / "clean-shutdown").exists()
    store = InstanceStore(data_dir)
    try:
        store.recover()
        assert keys_of(data_dir)[ds.SOPInstanceUID]["kind"] == "result"
    finally:
        store.close()


def test_an_input_of_a_results_own_uid_never_hides_the_result_from_queries(tmp_path: Path) -> None:
    """A PACS forwarding the node's output back stores an input with the result's SOP Instance
    UID: one query record stays, the result's, and purging that input keeps it findable."""
    from tests.store.test_store import put

    data_dir = tmp_path / "var"
    store = InstanceStore(data_dir)
    try:
        ds = radiograph(7, generate_uid(), "R7")
        path = store.save_result(ds)
        record = put(store, ds)  # the same object, received back as an input
        assert keys_of(data_dir)[str(ds.SOPInstanceUID)]["kind"] == "result"
        assert store.remove(record)  # the retention purge of the input
        assert keys_of(data_dir)[str(ds.SOPInstanceUID)]["path"] == str(path.relative_to(data_dir))
        assert [uid for _, uid in store.index.results()] == [str(ds.SOPInstanceUID)]
    finally:
        store.close()

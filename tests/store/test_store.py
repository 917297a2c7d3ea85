"""The instance store on its own: UID checks, atomic writes, replacement, recovery after a crash."""

import io
import os
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.store import InstanceStore, InvalidInstanceError, OutOfSpaceError, check_uid
from dicom_node.store.files import encode_file_meta, read_header
from tests.factories import ct_dataset, save


def encoded(ds) -> tuple:
    """(file meta, data set bytes) as the SCP receives them."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    head = encode_file_meta(ds.file_meta)
    assert raw.startswith(head)
    return ds.file_meta, raw[len(head):]


def place_unindexed(store: InstanceStore, ds, folder: Path) -> Path:
    """Put ``ds`` at its final path without indexing it, as a crash after the rename leaves it."""
    source = save(ds, folder / "src")
    target = store.files.instances / ds.StudyInstanceUID / ds.SeriesInstanceUID / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    return target


def put(store: InstanceStore, ds, calling: str = "SCU"):
    meta, body = encoded(ds)
    return store.commit(store.stage(meta, body), calling)


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.1.2.1", "0", "1.02.3"])
def test_check_uid_accepts_path_safe_uids(uid: str) -> None:
    assert check_uid("X", uid) == uid


@pytest.mark.parametrize("uid", ["", None, "..", "../1.2", "1.2/3", "1.2..3", ".1.2", "1.2.",
                                 "1.2.a", "1 .2", "1." + "2" * 63, "1.2\x00", "1.2\n"])
def test_check_uid_refuses_what_could_escape_or_is_malformed(uid) -> None:
    with pytest.raises(InvalidInstanceError) as info:
        check_uid("StudyInstanceUID", uid)
    assert info.value.kind == "uid"
    assert "StudyInstanceUID" in str(info.value)


def test_commit_writes_the_file_in_place_and_indexes_it(store: InstanceStore) -> None:
    ds = ct_dataset()
    record = put(store, ds, "MODALITY")
    path = store.path_of(record)
    assert path.relative_to(store.files.instances).parts == (
        ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{ds.SOPInstanceUID}.dcm")
    assert dcmread(path).PixelData == ds.PixelData
    assert store.index.get(ds.SOPInstanceUID) == record
    assert record.calling_ae_title == "MODALITY"
    assert list(store.files.tmp.iterdir()) == []


def test_invalid_instance_leaves_nothing_behind(store: InstanceStore) -> None:
    ds = ct_dataset()
    ds.SeriesInstanceUID = "../../escape"
    meta, body = encoded(ds)
    with pytest.raises(InvalidInstanceError):
        store.stage(meta, body)
    assert list(store.files.tmp.iterdir()) == []
    assert list(store.files.instances.iterdir()) == []
    assert store.index.counts() == (0, 0, 0)


def test_free_space_floor_refuses_before_writing(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, min_free_space=2**62)
    try:
        meta, body = encoded(ct_dataset())
        with pytest.raises(OutOfSpaceError):
            store.stage(meta, body)
        assert list(store.files.tmp.iterdir()) == []
    finally:
        store.close()


def test_resend_replaces_and_counts_once(store: InstanceStore) -> None:
    first = ct_dataset(seed=1)
    again = ct_dataset(study=first.StudyInstanceUID, series=first.SeriesInstanceUID,
                       sop=first.SOPInstanceUID, seed=2)
    put(store, first)
    record = put(store, again)
    assert store.index.counts() == (1, 1, 1)
    assert record.times_received == 2 and store.index.get(first.SOPInstanceUID) == record
    assert dcmread(store.path_of(record)).PixelData == again.PixelData


def test_series_records_keep_routing_attributes(store: InstanceStore) -> None:
    ds = ct_dataset()
    put(store, ds, "CT01")
    put(store, ct_dataset(study=ds.StudyInstanceUID, series=ds.SeriesInstanceUID))
    [series] = store.index.series(ds.StudyInstanceUID)
    assert (series.modality, series.body_part_examined, series.series_description,
            series.manufacturer, series.calling_ae_title, series.instance_count) == (
        "CT", "CHEST", "unit test series", "TestMaker", "CT01", 2)


def test_recover_removes_temporaries_of_interrupted_writes(store: InstanceStore) -> None:
    meta, body = encoded(ct_dataset())
    store.stage(meta, body)  # staged, never committed: the process died here
    assert len(list(store.files.tmp.iterdir())) == 1
    store.recover()
    assert list(store.files.tmp.iterdir()) == []
    assert store.index.counts() == (0, 0, 0)


def test_recover_indexes_a_file_renamed_before_the_crash(store: InstanceStore, tmp_path: Path) -> None:
    ds = ct_dataset()
    target = place_unindexed(store, ds, tmp_path)  # on disk in its place, but the index never heard
    store.recover()
    record = store.index.get(ds.SOPInstanceUID)
    assert record is not None and store.path_of(record) == target


def test_recover_keeps_the_newer_copy_of_a_moved_instance(store: InstanceStore, tmp_path: Path) -> None:
    old = ct_dataset()
    put(store, old)
    # The same SOP Instance UID arrived in another series; the crash came after the rename,
    # before the index commit: the new file is on disk, the index still names the old one.
    new = ct_dataset(study=old.StudyInstanceUID, sop=old.SOPInstanceUID, seed=5)
    target = place_unindexed(store, new, tmp_path)
    later = store.index.get(old.SOPInstanceUID).received_at + 5
    os.utime(target, (later, later))

    store.recover()
    record = store.index.get(old.SOPInstanceUID)
    assert store.path_of(record) == target
    assert [p for p in store.files.instances.rglob("*.dcm")] == [target]


def test_read_header_reads_no_pixels_and_checks_uids(tmp_path: Path) -> None:
    ds = ct_dataset()
    header = read_header(save(ds, tmp_path))
    assert (header.sop_instance_uid, header.modality, header.manufacturer) == (
        ds.SOPInstanceUID, "CT", "TestMaker")


def test_only_a_clean_stop_skips_the_scan_and_only_once(tmp_path: Path) -> None:
    first = InstanceStore(tmp_path)
    first.recover()
    first.close(clean_shutdown=True)
    assert (tmp_path / "clean-shutdown").exists()

    second = InstanceStore(tmp_path)
    second.recover()  # consumes the marker: this run may crash
    assert not (tmp_path / "clean-shutdown").exists()
    ds = ct_dataset()
    place_unindexed(second, ds, tmp_path)
    second.close()  # not clean: as after a crash

    third = InstanceStore(tmp_path)
    try:
        third.recover()
        assert third.index.get(ds.SOPInstanceUID) is not None
    finally:
        third.close()


def test_concurrent_stores_of_one_uid_leave_exactly_one_consistent_copy(store: InstanceStore) -> None:
    import threading

    study, sop = ct_dataset().StudyInstanceUID, ct_dataset().SOPInstanceUID
    series = [ct_dataset().SeriesInstanceUID for _ in range(3)]
    copies = [ct_dataset(study=study, series=series[i % 3], sop=sop, seed=i) for i in range(12)]
    staged = [store.stage(*encoded_parts(ds)) for ds in copies]
    barrier = threading.Barrier(len(staged))

    def commit(item) -> None:
        barrier.wait()
        store.commit(item, "SCU")

    threads = [threading.Thread(target=commit, args=(item,)) for item in staged]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    files = list(store.files.instances.rglob("*.dcm"))
    record = store.index.get(sop)
    assert record is not None and files == [store.path_of(record)]
    on_disk = dcmread(files[0])
    assert on_disk.SeriesInstanceUID == record.series_instance_uid
    assert record.size_bytes == files[0].stat().st_size
    assert record.times_received == 12


def encoded_parts(ds) -> tuple:
    meta, body = encoded(ds)
    return meta, body


def test_a_failed_index_commit_loses_nothing_and_forces_a_scan(tmp_path: Path) -> None:
    import sqlite3

    from dicom_node.store import StorageError

    store = InstanceStore(tmp_path)
    store.recover()
    ds = ct_dataset()
    real_put = store.index.put

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    store.index.put = locked  # type: ignore[method-assign]
    with pytest.raises(StorageError, match="cannot index instance"):
        put(store, ds)
    store.index.put = real_put  # type: ignore[method-assign]
    store.close(clean_shutdown=True)  # asked for a clean stop, but files and index disagree
    assert not (tmp_path / "clean-shutdown").exists()

    again = InstanceStore(tmp_path)
    try:
        again.recover()
        assert again.index.get(ds.SOPInstanceUID) is not None
    finally:
        again.close()


def test_recovered_instances_keep_the_calling_ae_title(store: InstanceStore, tmp_path: Path) -> None:
    ds = ct_dataset()
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY7"  # as the SCP writes it
    record = put(store, ds, "MODALITY7")
    path = store.path_of(record)
    kept = path.read_bytes()
    store.close()
    (tmp_path / "data" / "index.sqlite").unlink()  # the index is lost; the files are the truth
    for extra in ("-wal", "-shm"):
        (tmp_path / "data" / f"index.sqlite{extra}").unlink(missing_ok=True)
    again = InstanceStore(tmp_path / "data")
    try:
        again.recover()
        [series] = again.index.series()
        assert series.calling_ae_title == "MODALITY7"
        assert again.path_of(again.index.get(ds.SOPInstanceUID)).read_bytes() == kept
    finally:
        again.close()

"""``InstanceStore.stage`` on what a peer may send: spooled files, group 0002, deflate bombs."""

import io
import shutil
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicom_node.store import InstanceStore, InvalidInstanceError, OutOfSpaceError
from tests.factories import ct_dataset
from tests.malformed import body

FILE_META_INSIDE = b"\x02\x00\x10\x00UI\x12\x001.2.840.10008.1.2\x00"  # (0002,0010) = implicit VR


def _deflated(data: bytes, trailer: bytes = b"") -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush() + trailer


def test_a_spooled_data_set_loses_its_group_0002_and_keeps_the_rest(store: InstanceStore, tmp_path: Path) -> None:
    ds = ct_dataset(size=64)
    spool = tmp_path / "spool.part"
    spool.write_bytes(FILE_META_INSIDE + body(ds))
    with spool.open("rb") as fp:
        staged = store.stage(ds.file_meta, fp)
    assert staged.stripped_tags == ("(0002,0010)",)
    stored = dcmread(staged.temporary)
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.PixelData == ds.PixelData
    assert staged.size_bytes == staged.temporary.stat().st_size
    store.discard(staged)


def test_a_deflated_data_set_is_inflated_and_walked(store: InstanceStore) -> None:
    ds = ct_dataset(size=64)
    data = _deflated(body(ds)) + b"\x00"  # with the padding byte writers add
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    staged = store.stage(ds.file_meta, data)
    assert dcmread(staged.temporary).PixelData == ds.PixelData
    header = staged.header  # read from the inflated scratch file, not inflated a second time
    assert (header.sop_instance_uid, header.series_instance_uid, header.modality) == \
        (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.Modality)
    assert header.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    store.discard(staged)


@pytest.mark.parametrize(("data", "reason"), [
    (_deflated(bytes(64 * 2**20)), "inflates to more than"),  # 64 KiB that inflate to 64 MiB
    (_deflated(FILE_META_INSIDE + body(ct_dataset())), "group 0002"),
    (_deflated(body(ct_dataset()), trailer=bytes(16)), "trailing"),
    (_deflated(body(ct_dataset()))[:-20], "truncated"),
    (b"not deflate at all" * 10, "does not inflate"),
    (_deflated(body(ct_dataset())[:-10]), "past the end"),  # inflates, but to a cut data set
])
def test_bad_deflated_data_sets_are_refused_and_leave_nothing(store: InstanceStore, data: bytes,
                                                              reason: str) -> None:
    meta = ct_dataset().file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with pytest.raises(InvalidInstanceError) as info:
        store.stage(meta, io.BytesIO(data), max_inflated_size=2**20)
    assert reason in str(info.value)
    assert not list(store.files.tmp.iterdir())


def test_a_deflate_bomb_stops_at_the_free_space_floor(store: InstanceStore,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import dicom_node.store as store_module

    limits: list[int] = []
    real_inflate = store_module.inflate

    def recording_inflate(*args: object) -> int:
        limits.append(int(args[-1]))  # type: ignore[call-overload]
        return real_inflate(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "inflate", recording_inflate)
    free = shutil.disk_usage(store.data_dir).free
    store.min_free_space = free - 2**20  # 1 MiB above the floor; the bomb inflates to 64 MiB
    meta = ct_dataset().file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with pytest.raises(OutOfSpaceError, match="free space"):
        store.stage(meta, io.BytesIO(_deflated(bytes(64 * 2**20))), max_inflated_size=2**31)
    assert limits and limits[0] <= 2**20 + 2**16  # never inflated far past the room left
    assert not list(store.files.tmp.iterdir())

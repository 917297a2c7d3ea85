"""The SCP against pynetdicom SCUs in the same process: round trips, bad input, policies."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node import IMPLEMENTATION_CLASS_UID
from dicom_node.config import Settings
from dicom_node.ingest.scp import TRANSFER_SYNTAXES, IngestServer, start_ingest
from dicom_node.ingest.status import StoreStatus
from dicom_node.store import InstanceStore
from tests.conftest import make_settings
from tests.factories import ct_dataset, new_uid, save

# pydicom's bundled files: one per transfer syntax a PACS sends, and non-image SOP classes.
SAMPLES = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",  # deflated
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_16.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "test-SR.dcm",  # Comprehensive SR
    "liver_1frame.dcm",  # Segmentation
    "waveform_ecg.dcm",
]


@contextmanager
def association(
    port: int, called: str = "XAI_NODE", calling: str = "TEST_SCU", contexts: list | None = None
) -> Iterator[Association]:
    ae = AE(ae_title=calling)
    for sop_class, syntaxes in contexts or [(CTImageStorage, [ExplicitVRLittleEndian])]:
        ae.add_requested_context(sop_class, syntaxes)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30  # a loaded 2-core machine is slow, not wrong
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def send(port: int, *datasets, **kwargs) -> list[tuple[int, str]]:
    """Send data sets over one association; return (status, error comment) per data set."""
    results = []
    with association(port, **kwargs) as assoc:
        assert assoc.is_established
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            results.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
    return results


def leftovers(data_dir: Path) -> list[Path]:
    """Files on disk that are not in the index: temporaries and unindexed instances."""
    return [p for p in (data_dir / "tmp").iterdir()] + [
        p for p in (data_dir / "instances").rglob("*") if p.is_file()
    ]


def test_echo(node: IngestServer) -> None:
    with association(node.port, contexts=[(Verification, [ExplicitVRLittleEndian])]) as assoc:
        assert assoc.send_c_echo().Status == 0


def test_store_round_trip(node: IngestServer, store: InstanceStore) -> None:
    ds = ct_dataset()
    assert send(node.port, ds) == [(StoreStatus.SUCCESS, "")]

    record = store.index.get(ds.SOPInstanceUID)
    assert record is not None
    assert (record.study_instance_uid, record.series_instance_uid) == (
        ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert (record.modality, record.body_part_examined, record.calling_ae_title) == (
        "CT", "CHEST", "TEST_SCU")
    path = store.path_of(record)
    assert path == store.files.instances / ds.StudyInstanceUID / ds.SeriesInstanceUID / (
        f"{ds.SOPInstanceUID}.dcm")
    stored = dcmread(path)
    assert stored.file_meta.SourceApplicationEntityTitle == "TEST_SCU"
    assert stored.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert stored.PixelData == ds.PixelData
    assert stored.PatientName == ds.PatientName
    assert record.size_bytes == path.stat().st_size
    assert list((store.data_dir / "tmp").iterdir()) == []


@pytest.mark.parametrize("name", SAMPLES)
def test_stored_as_received_in_its_transfer_syntax(
    node: IngestServer, store: InstanceStore, name: str, tmp_path: Path
) -> None:
    path = _with_study_and_series(Path(get_testdata_file(name)), tmp_path)
    source = dcmread(path, stop_before_pixels=True)
    syntax = source.file_meta.TransferSyntaxUID
    assert syntax in TRANSFER_SYNTAXES
    contexts = [(source.SOPClassUID, [syntax])]
    assert _send_file(node.port, path, contexts=contexts) == (0, "")

    record = store.index.get(source.SOPInstanceUID)
    assert record is not None and record.transfer_syntax_uid == syntax
    stored = store.path_of(record)
    assert dcmread(stored).file_meta.TransferSyntaxUID == syntax
    # The data set's encoded bytes are exactly those sent: no decoding, no transcoding.
    assert _data_set_bytes(stored) == _data_set_bytes(path)


def _with_study_and_series(path: Path, folder: Path) -> Path:
    """Some bundled samples lack Study/Series Instance UIDs (refused, rightly); add them."""
    ds = dcmread(path)
    if "StudyInstanceUID" in ds and "SeriesInstanceUID" in ds:
        return path
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    return save(ds, folder)


def _data_set_bytes(path: Path) -> bytes:
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_four_concurrent_associations_of_100(node: IngestServer, store: InstanceStore) -> None:
    study = new_uid()
    batches = [[ct_dataset(study=study, series=s) for _ in range(100)]
               for s in (new_uid() for _ in range(4))]
    results: list[list[tuple[int, str]]] = [[] for _ in batches]

    def run(i: int) -> None:
        results[i] = send(node.port, *batches[i], calling=f"SCU{i}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r == [(0, "")] * 100 for r in results)
    assert store.index.counts() == (1, 4, 400)
    assert sorted(s.instance_count for s in store.index.series(study)) == [100] * 4


def test_same_sop_instance_uid_replaces_and_counts_once(
    node: IngestServer, store: InstanceStore
) -> None:
    first = ct_dataset(seed=1)
    second = ct_dataset(study=first.StudyInstanceUID, series=first.SeriesInstanceUID,
                        sop=first.SOPInstanceUID, seed=2)
    assert send(node.port, first, second) == [(0, ""), (0, "")]
    assert store.index.counts() == (1, 1, 1)
    record = store.index.get(first.SOPInstanceUID)
    assert record is not None and record.times_received == 2
    assert dcmread(store.path_of(record)).PixelData == second.PixelData


def test_same_uid_under_another_series_moves_the_instance(
    node: IngestServer, store: InstanceStore
) -> None:
    first = ct_dataset()
    moved = ct_dataset(study=first.StudyInstanceUID, sop=first.SOPInstanceUID)
    assert send(node.port, first, moved) == [(0, ""), (0, "")]
    assert store.index.counts()[2] == 1
    files = [p for p in store.files.instances.rglob("*.dcm")]
    assert len(files) == 1 and moved.SeriesInstanceUID in str(files[0])


def _with(ds, **attributes):
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


BAD_UID_CASES = {
    "study uid escapes data folder": {"StudyInstanceUID": "../../../../tmp/evil"},
    "series uid with slash": {"SeriesInstanceUID": "1.2/3"},
    "empty component": {"SeriesInstanceUID": "1.2..3"},
    "too long": {"StudyInstanceUID": "1." + "2" * 70},
    "study uid missing": {"StudyInstanceUID": None},
    "series uid missing": {"SeriesInstanceUID": None},
}


@pytest.mark.parametrize("case", sorted(BAD_UID_CASES))
def test_bad_uids_are_refused_and_the_node_stays_up(
    node: IngestServer, store: InstanceStore, case: str
) -> None:
    bad = _with(ct_dataset(), **BAD_UID_CASES[case])
    [(status, comment)] = send(node.port, bad)
    assert status == StoreStatus.CANNOT_UNDERSTAND_INVALID_UID
    assert "UID" in comment
    assert leftovers(store.data_dir) == []
    assert send(node.port, ct_dataset()) == [(0, "")]  # the next association still succeeds


def test_sop_class_mismatch_is_refused(node: IngestServer, store: InstanceStore, tmp_path) -> None:
    ds = ct_dataset()
    ds.SOPClassUID = MRImageStorage  # the data set says MR, the file meta (and command) say CT
    path = save(ds, tmp_path / "src")
    raw = path.read_bytes()  # CT and MR Image Storage UIDs have the same length: patch the meta
    path.write_bytes(raw.replace(str(MRImageStorage).encode(), str(CTImageStorage).encode(), 1))
    status, comment = _send_file(node.port, path)
    assert status == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert "SOPClassUID" in comment
    assert store.index.get(ds.SOPInstanceUID) is None
    assert leftovers(store.data_dir) == []


def test_sop_instance_uid_mismatch_is_refused(node: IngestServer, store: InstanceStore) -> None:
    # pydicom's rtplan.dcm: file meta and data set name different SOP Instance UIDs.
    path = Path(get_testdata_file("rtplan.dcm"))
    contexts = [(dcmread(path).SOPClassUID, [dcmread(path).file_meta.TransferSyntaxUID])]
    status, comment = _send_file(node.port, path, contexts=contexts)
    assert status == StoreStatus.CANNOT_UNDERSTAND_UID_MISMATCH
    assert "SOPInstanceUID" in comment
    assert leftovers(store.data_dir) == []


def _send_file(port: int, path: Path, **kwargs) -> tuple[int, str]:
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        with association(port, **kwargs) as assoc:
            rsp = assoc.send_c_store(path)
            return int(rsp.Status), str(rsp.get("ErrorComment", ""))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def test_data_set_that_does_not_parse(node: IngestServer, store: InstanceStore, tmp_path) -> None:
    path = save(ct_dataset(), tmp_path / "src")
    raw = path.read_bytes()
    meta_end = raw.index(b"\x08\x00")  # first group 0008 tag after the file meta
    path.write_bytes(raw[:meta_end] + b"\x08\x00\x16\x00ZZ\x04\x00abcd")  # VR "ZZ" does not exist
    status, comment = _send_file(node.port, path)
    assert status == StoreStatus.CANNOT_UNDERSTAND
    assert "no valid VR" in comment
    assert leftovers(store.data_dir) == []
    assert send(node.port, ct_dataset()) == [(0, "")]


def test_instance_over_size_limit(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", max_instance_size=4096)
    store = InstanceStore(settings.node.data_dir)
    server = start_ingest(settings, store)
    try:
        [(status, comment)] = send(server.port, ct_dataset(size=64))
        assert status == StoreStatus.OUT_OF_RESOURCES_INSTANCE_TOO_LARGE
        assert "limit" in comment
        assert leftovers(store.data_dir) == []
        assert send(server.port, ct_dataset(size=8)) == [(0, "")]
    finally:
        server.stop(2.0)
        store.close()


def test_disk_below_free_space_floor(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    floor = 2**62  # more than any disk has free
    store = InstanceStore(settings.node.data_dir, min_free_space=floor)
    server = start_ingest(settings, store)
    try:
        [(status, comment)] = send(server.port, ct_dataset())
        assert status == StoreStatus.OUT_OF_RESOURCES == 0xA700
        assert "free space" in comment
        assert leftovers(store.data_dir) == []
        store.min_free_space = 0  # space freed: the next association stores again
        assert send(server.port, ct_dataset()) == [(0, "")]
    finally:
        server.stop(2.0)
        store.close()


def _reject_of(port: int, **kwargs) -> tuple[int, int, int] | None:
    with association(port, **kwargs) as assoc:
        if assoc.is_established:
            return None
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        return (rj.result, rj.result_source, rj.diagnostic)


def test_called_ae_title_must_be_the_nodes(node: IngestServer) -> None:
    assert _reject_of(node.port, called="SOMEONE") == (0x01, 0x01, 0x07)
    assert send(node.port, ct_dataset()) == [(0, "")]


def test_allowed_peers_rejects_other_calling_ae_titles(tmp_path: Path) -> None:
    base = make_settings(tmp_path / "data")
    settings = replace(base, node=replace(base.node, allowed_peers=("MODALITY", "PACS@127.0.0.1",
                                                                    "REMOTE@10.0.0.9")))
    store = InstanceStore(settings.node.data_dir)
    server = start_ingest(settings, store)
    try:
        assert _reject_of(server.port, calling="INTRUDER") == (0x01, 0x01, 0x03)
        assert _reject_of(server.port, calling="REMOTE") == (0x01, 0x01, 0x03)  # wrong host
        assert _reject_of(server.port, calling="MODALITY") is None
        assert _reject_of(server.port, calling="PACS") is None
    finally:
        server.stop(2.0)
        store.close()


def test_association_cap_rejects_transiently(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", max_associations=2)
    store = InstanceStore(settings.node.data_dir)
    server = start_ingest(settings, store)
    try:
        with association(server.port) as a, association(server.port) as b:
            assert a.is_established and b.is_established
            assert _reject_of(server.port) == (0x02, 0x03, 0x02)
        assert send(server.port, ct_dataset()) == [(0, "")]
    finally:
        server.stop(2.0)
        store.close()


def test_restart_on_same_data_dir_keeps_everything(tmp_path: Path) -> None:
    settings: Settings = make_settings(tmp_path / "data")
    sent = [ct_dataset() for _ in range(5)]
    store = InstanceStore(settings.node.data_dir)
    server = start_ingest(settings, store)
    assert send(server.port, *sent) == [(0, "")] * 5
    server.stop(2.0)
    store.close()

    store = InstanceStore(settings.node.data_dir)
    store.recover()
    server = start_ingest(settings, store)
    try:
        assert store.index.counts() == (5, 5, 5)
        for ds in sent:
            record = store.index.get(ds.SOPInstanceUID)
            assert record is not None
            assert dcmread(store.path_of(record)).PixelData == ds.PixelData
        assert send(server.port, ct_dataset()) == [(0, "")]
        assert store.index.counts()[2] == 6
    finally:
        server.stop(2.0)
        store.close()


def test_stop_aborts_associations_that_outlive_the_grace(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    store = InstanceStore(settings.node.data_dir)
    server = start_ingest(settings, store)
    with association(server.port) as assoc:
        assert assoc.is_established
        server.stop(grace_seconds=0.2)
        assert not server.server.active_associations
        deadline = time.monotonic() + 5
        while not assoc.is_aborted and time.monotonic() < deadline:  # the peer sees the abort
            time.sleep(0.01)
        assert assoc.is_aborted
    store.close()


def test_an_unexpected_error_answers_processing_failure_with_a_reason(
    node: IngestServer, store: InstanceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store.index, "put", locked)
    [(status, comment)] = send(node.port, ct_dataset())
    assert status == StoreStatus.PROCESSING_FAILURE
    assert "cannot index instance" in comment
    assert store.needs_scan
    monkeypatch.undo()
    assert send(node.port, ct_dataset()) == [(0, "")]


@pytest.mark.parametrize(
    ("proposed", "chosen"),
    [
        ([JPEG2000Lossless, RLELossless, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        ([JPEGBaseline8Bit, JPEGLosslessSV1], JPEGLosslessSV1),  # never lossy when lossless is offered
        ([JPEG2000], JPEG2000),
    ],
)
def test_transfer_syntax_preference(node: IngestServer, proposed: list, chosen: object) -> None:
    with association(node.port, contexts=[(CTImageStorage, proposed)]) as assoc:
        [context] = assoc.accepted_contexts
        assert context.transfer_syntax[0] == chosen

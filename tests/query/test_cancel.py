"""C-CANCEL over a real association (pynetdicom as the peer, the node's SCP in this process): a
C-FIND, a C-GET and a C-MOVE cancelled after their first pending response end with 0xFE00 and
honest counts, long before they would have finished."""

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.config import Destination, Settings
from dicom_node.ingest.scp import IngestServer, start_ingest
from dicom_node.phantoms import render, to_dataset
from dicom_node.store import InstanceStore
from dicom_node.store.db import transaction
from dicom_node.store.keyindex import put_keys
from dicom_node.store.keys import Kind

STUDY = "2.25.777"
FILES = 40  # instances with files, for C-GET and C-MOVE
MATCHES = 3000  # study records for C-FIND: seconds of responses, cancelled after the first


@pytest.fixture
def node(settings: Settings, tmp_path: Path) -> Iterator[tuple[IngestServer, InstanceStore, AE]]:
    archive = AE(ae_title="ARCHIVE")
    archive.add_supported_context(SecondaryCaptureImageStorage)
    archive_server = archive.start_server(("127.0.0.1", 0), block=False,
                                          evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    port = archive_server.server_address[1]
    settings = dataclasses.replace(
        settings, node=dataclasses.replace(settings.node, query_peers=("PEER",)),
        destinations=(Destination(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=port),))
    store = InstanceStore(settings.node.data_dir)
    for n in range(FILES):
        ds = to_dataset(render(n, 32), study_uid=STUDY, series_uid="2.25.778")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        store.save_result(ds)
    with transaction(store.index._conn) as conn:
        for n in range(MATCHES):
            put_keys(conn, Kind.RESULT, f"results/x/{n}.dcm", "1.2.840.10008.1.2.1", 0.0, {
                "study_instance_uid": f"2.25.9{n}", "series_instance_uid": "2.25.1", "sop_instance_uid": f"2.25.8{n}",
                "sop_class_uid": SecondaryCaptureImageStorage})
    server = start_ingest(settings, store)
    yield server, store, archive
    server.stop(1.0)
    store.close()
    archive.shutdown()


def associate(port: int, *contexts: str, roles: list[Any] | None = None, handlers: list[Any] | None = None) -> Any:
    ae = AE(ae_title="PEER")
    for uid in contexts:
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", port, ae_title="XAI_NODE", ext_neg=roles, evt_handlers=handlers)
    assert assoc.is_established
    return assoc


def cancel_after_first(assoc: Any, responses: Iterator[tuple[Dataset, Any]], sop_class: str) -> list[Dataset]:
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class)
    statuses = []
    for status, _ in responses:
        statuses.append(status)
        if len(statuses) == 1:
            assoc.send_c_cancel(1, context.context_id)
    return statuses


def study(level: str = "STUDY", uid: str = STUDY) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = level, uid
    return ds


class _Paced:
    """A C-FIND query whose every answer takes 2 ms to build: without it the node can send all
    the matches before the peer's C-CANCEL reaches it, and the test would depend on the machine."""

    def __init__(self, query: Any) -> None:
        self._query = query

    def __getattr__(self, name: str) -> Any:
        return getattr(self._query, name)

    def dataset(self, row: Any) -> Dataset:
        time.sleep(0.002)
        return self._query.dataset(row)


def test_a_cancelled_find_ends_with_cancel(node: tuple[IngestServer, InstanceStore, AE],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import dicom_node.query.scp

    find = dicom_node.query.scp.find
    monkeypatch.setattr(dicom_node.query.scp, "find", lambda *a, **k: _Paced(find(*a, **k)))
    server, _, _ = node
    assoc = associate(server.port, StudyRootQueryRetrieveInformationModelFind)
    try:
        statuses = cancel_after_first(assoc, assoc.send_c_find(study(uid=""), StudyRootQueryRetrieveInformationModelFind),
                                      StudyRootQueryRetrieveInformationModelFind)
    finally:
        assoc.release()
    assert statuses[-1].Status == 0xFE00
    assert 1 <= len(statuses) - 1 < MATCHES // 2  # stopped long before every match went


def test_a_cancelled_get_ends_with_cancel_and_counts(node: tuple[IngestServer, InstanceStore, AE]) -> None:
    server, _, _ = node
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    assoc = associate(server.port, StudyRootQueryRetrieveInformationModelGet, SecondaryCaptureImageStorage,
                      roles=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
                      handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        statuses = cancel_after_first(assoc, assoc.send_c_get(study(), StudyRootQueryRetrieveInformationModelGet),
                                      StudyRootQueryRetrieveInformationModelGet)
    finally:
        assoc.release()
    final = statuses[-1]
    assert final.Status == 0xFE00 and final.NumberOfRemainingSuboperations > 0
    assert final.NumberOfCompletedSuboperations == len(received) < FILES
    assert final.NumberOfCompletedSuboperations + final.NumberOfRemainingSuboperations == FILES


def test_a_get_without_cancel_sends_every_instance(node: tuple[IngestServer, InstanceStore, AE]) -> None:
    server, _, _ = node
    received: list[str] = []
    assoc = associate(server.port, StudyRootQueryRetrieveInformationModelGet, SecondaryCaptureImageStorage,
                      roles=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
                      handlers=[(evt.EVT_C_STORE, lambda event: received.append("x") or 0x0000)])
    try:
        statuses = [s for s, _ in assoc.send_c_get(study(), StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    assert statuses[-1].Status == 0x0000 and statuses[-1].NumberOfCompletedSuboperations == FILES == len(received)


def test_a_cancelled_move_ends_with_cancel(node: tuple[IngestServer, InstanceStore, AE]) -> None:
    server, _, _ = node
    assoc = associate(server.port, StudyRootQueryRetrieveInformationModelMove)
    try:
        statuses = cancel_after_first(
            assoc, assoc.send_c_move(study(), "ARCHIVE", StudyRootQueryRetrieveInformationModelMove),
            StudyRootQueryRetrieveInformationModelMove)
    finally:
        assoc.release()
    final = statuses[-1]
    assert final.Status == 0xFE00 and 0 < final.NumberOfRemainingSuboperations < FILES

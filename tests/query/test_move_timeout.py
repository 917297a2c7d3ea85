"""A C-MOVE to a destination that never completes the TCP handshake (its accept queue is full)
or never answers the association request ends within the configured timeouts, not the OS's
minutes."""

import dataclasses
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

from dicom_node.config import Destination, Settings
from dicom_node.ingest.scp import start_ingest
from dicom_node.phantoms import render, to_dataset
from dicom_node.store import InstanceStore

STUDY = "2.25.4711"


@pytest.fixture
def stalled() -> Iterator[tuple[int, socket.socket]]:
    """A listener that never accepts, its queue (backlog 0) filled by one connection: a further
    connect gets no SYN-ACK, as from a dead host. The filler itself is "accepted" by the kernel
    and never answered, as a hung peer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=2)
    yield listener.getsockname()[1], listener
    filler.close()
    listener.close()


def _move(settings: Settings, tmp_path: Path, port: int, acse_timeout: float) -> tuple[float, int]:
    destination = Destination(name="dead", ae_title="DEAD", host="127.0.0.1", port=port,
                              connect_timeout_seconds=1.0)
    settings = dataclasses.replace(
        settings, node=dataclasses.replace(settings.node, query_peers=("PEER",)), destinations=(destination,),
        ingest=dataclasses.replace(settings.ingest, acse_timeout=acse_timeout))
    store = InstanceStore(tmp_path / "var")
    store.save_result(to_dataset(render(1, 32), study_uid=STUDY, series_uid="2.25.4712"))
    server = start_ingest(settings, store)
    try:
        ae = AE(ae_title="PEER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        ae.dimse_timeout = 10  # longer than the bound checked: the node must answer first
        assoc = ae.associate("127.0.0.1", server.port, ae_title="XAI_NODE")
        assert assoc.is_established
        identifier = Dataset()
        identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", STUDY
        started = time.monotonic()
        statuses = [int(status.Status) for status, _ in
                    assoc.send_c_move(identifier, "DEAD", StudyRootQueryRetrieveInformationModelMove) if status]
        elapsed = time.monotonic() - started
        assoc.release()
        return elapsed, statuses[-1] if statuses else -1  # none: the peer gave up waiting
    finally:
        server.stop(1.0)
        store.close()


def test_a_move_to_a_destination_that_never_accepts_ends_within_its_connect_timeout(
        settings: Settings, tmp_path: Path, stalled: tuple[int, socket.socket]) -> None:
    elapsed, final = _move(settings, tmp_path, stalled[0], acse_timeout=30.0)
    assert final == 0xA801 and elapsed < 8.0  # connect timeout 1 s; without it the OS's ~130 s


def test_a_move_to_a_destination_that_never_answers_ends_within_the_acse_timeout(
        settings: Settings, tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # the kernel completes the handshake; nobody reads the request
    try:
        elapsed, final = _move(settings, tmp_path, listener.getsockname()[1], acse_timeout=2.0)
    finally:
        listener.close()
    assert final == 0xA801 and elapsed < 8.0

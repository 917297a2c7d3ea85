"""The association guard in process: spooling, refusal without losing the association, and
protocol violations that could make the node buffer without bound."""

import logging
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

from dicom_node.ingest.scp import IngestServer, start_ingest
from dicom_node.ingest.status import StoreStatus
from dicom_node.store import InstanceStore
from tests.conftest import make_settings
from tests.factories import ct_dataset
from tests.ingest.attacker import COMMAND, LAST, Attacker, p_data, store_command
from tests.ingest.test_scp import send

KiB, MiB = 2**10, 2**20


@pytest.fixture
def small_node(tmp_path: Path) -> Iterator[tuple[IngestServer, InstanceStore]]:
    settings = make_settings(tmp_path / "data", max_instance_size=1 * MiB, spool_threshold=256 * KiB)
    store = InstanceStore(settings.node.data_dir, 0)
    server = start_ingest(settings, store)
    yield server, store
    server.stop(grace_seconds=2.0)
    store.close()


def test_a_data_set_past_the_threshold_is_spooled_then_stored(
    small_node: tuple[IngestServer, InstanceStore], caplog: pytest.LogCaptureFixture
) -> None:
    server, store = small_node
    ds = ct_dataset(size=512, seed=3)  # 512 KiB of pixels: spooled after 256 KiB
    with caplog.at_level(logging.DEBUG, logger="dicom_node.ingest.limits"):
        assert send(server.port, ds) == [(StoreStatus.SUCCESS, "")]
    assert any("spooling" in r.getMessage() for r in caplog.records)
    record = store.index.get(ds.SOPInstanceUID)
    assert record is not None
    assert dcmread(store.path_of(record)).PixelData == ds.PixelData
    assert not list((store.data_dir / "tmp").iterdir())  # pynetdicom removed the spool file


def test_a_refused_instance_leaves_the_association_usable(
    small_node: tuple[IngestServer, InstanceStore]
) -> None:
    server, store = small_node
    big, small = ct_dataset(size=866), ct_dataset()  # 1.43 MiB of pixels, then a tiny one
    statuses = send(server.port, big, small)
    assert statuses[0][0] == StoreStatus.OUT_OF_RESOURCES_INSTANCE_TOO_LARGE
    assert "exceeds limit 1048576" in statuses[0][1]
    assert statuses[1] == (StoreStatus.SUCCESS, "")
    assert store.index.get(big.SOPInstanceUID) is None
    assert not list((store.data_dir / "tmp").iterdir())


def _aborted(attacker: Attacker) -> bool:
    answer = attacker.read(5.0)
    return answer is not None and answer.pdu_type == 0x07 and attacker.read(5.0) is None and attacker.closed


def test_a_data_set_before_its_command_is_aborted(small_node: tuple[IngestServer, InstanceStore]) -> None:
    server, _ = small_node
    with Attacker(server.port) as attacker:
        attacker.associate(CTImageStorage, ExplicitVRLittleEndian)
        attacker.send(p_data(1, 0x00, bytes(64 * KiB)))
        assert _aborted(attacker)


def test_an_endless_command_set_is_aborted(small_node: tuple[IngestServer, InstanceStore]) -> None:
    server, _ = small_node
    with Attacker(server.port) as attacker:
        attacker.associate(CTImageStorage, ExplicitVRLittleEndian)
        for _ in range(8):  # command fragments that never say "last": 128 KiB in all
            if not attacker.send(p_data(1, COMMAND, bytes(16 * KiB))):
                break
        assert _aborted(attacker)


def test_a_connection_cut_mid_spool_leaves_no_spool_file(small_node: tuple[IngestServer, InstanceStore]) -> None:
    server, store = small_node
    with Attacker(server.port) as attacker:
        attacker.associate(CTImageStorage, ExplicitVRLittleEndian)
        attacker.send(store_command(1, CTImageStorage, "1.2.826.0.1.3680043.10.1543.78"))
        for _ in range(5):  # 640 KiB: spooled (threshold 256 KiB), under the 1 MiB limit
            attacker.send(p_data(1, 0x00, bytes(128 * KiB - 6)))  # a PDU of exactly the maximum
        deadline = time.monotonic() + 10
        while not list(store.files.tmp.glob("spool-*.part")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(store.files.tmp.glob("spool-*.part")), "the data set was never spooled"
    # the connection is gone mid-data set
    deadline = time.monotonic() + 10
    while list(store.files.tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not list(store.files.tmp.iterdir())


def _spool_files(store: InstanceStore) -> list[Path]:
    return list(store.files.tmp.glob("spool-*.part"))


def _poll(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_an_abort_with_a_spooled_store_queued_leaves_no_spool_file(
    small_node: tuple[IngestServer, InstanceStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler is busy with one C-STORE; a second, spooled and complete, waits in the
    queue when the peer aborts: its spool file goes with the association (spoolleak.py)."""
    server, store = small_node
    busy, go_on = threading.Event(), threading.Event()
    real_stage = store.stage

    def slow_stage(*args: Any, **kwargs: Any) -> Any:
        busy.set()
        go_on.wait(10.0)
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(store, "stage", slow_stage)
    try:
        with Attacker(server.port) as attacker:
            attacker.associate(CTImageStorage, ExplicitVRLittleEndian)
            attacker.send(store_command(1, CTImageStorage, "1.2.826.0.1.3680043.10.1543.80"))
            attacker.send(p_data(1, LAST, bytes(1000)))
            assert busy.wait(10.0)
            attacker.send(store_command(1, CTImageStorage, "1.2.826.0.1.3680043.10.1543.81", 2))
            for number in range(5):  # 640 KiB: spooled past 256 KiB
                attacker.send(p_data(1, LAST if number == 4 else 0, bytes(128 * KiB - 6)))
            queued = lambda: any(a.dimse.msg_queue.qsize() for a in server.server.active_associations)  # noqa: E731
            assert _poll(queued, 10.0), "the second C-STORE never got queued"
            assert _spool_files(store)
            attacker.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT
    finally:
        go_on.set()
    assert _poll(lambda: not server.server.active_associations, 10.0)
    assert _poll(lambda: not _spool_files(store), 5.0), _spool_files(store)


def test_the_data_set_of_a_request_other_than_c_store_is_capped(
    small_node: tuple[IngestServer, InstanceStore]
) -> None:
    """A C-FIND-RQ with a 256 KiB identifier: aborted past 64 KiB, not held up to 1 MiB."""
    server, _ = small_node
    command = Dataset()
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField = 0x0020  # C-FIND-RQ
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    with Attacker(server.port) as attacker:
        attacker.associate(CTImageStorage, ExplicitVRLittleEndian)
        body = encode(command, True, True)
        assert body is not None
        group_length = b"\x00\x00\x00\x00\x04\x00\x00\x00" + struct.pack("<L", len(body))
        attacker.send(p_data(1, COMMAND | LAST, group_length + body))
        for _ in range(16):
            if not attacker.send(p_data(1, 0x00, bytes(16 * KiB))):
                break
        assert _aborted(attacker)


def test_refusals_of_one_peer_log_a_bounded_number_of_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused C-STOREs, by the handler (undecodable) and by the guard (too large), share the
    peer's budget of log lines: a peer decides how many it sends."""
    caplog.set_level(logging.WARNING, logger="dicom_node")
    settings = make_settings(tmp_path / "data", max_instance_size=256 * KiB,
                             spool_threshold=128 * KiB, log_lines_per_host_per_minute=3)
    store = InstanceStore(settings.node.data_dir, 0)
    server = start_ingest(settings, store)
    try:
        with Attacker(server.port) as attacker:
            attacker.associate(CTImageStorage, ExplicitVRLittleEndian)
            for number in range(1, 9):
                uid = f"1.2.826.0.1.3680043.10.1543.9{number}"
                attacker.send(store_command(1, CTImageStorage, uid, number))
                size = 300 * KiB if number % 2 else 1000  # too large, or undecodable
                for offset in range(0, size, 100 * KiB):
                    last = offset + 100 * KiB >= size
                    attacker.send(p_data(1, LAST if last else 0, b"\xff" * min(100 * KiB, size - offset)))
                answer = attacker.read(10.0)
                assert answer is not None and answer.command is not None
                assert answer.command.Status in (StoreStatus.OUT_OF_RESOURCES_INSTANCE_TOO_LARGE,
                                                 StoreStatus.CANNOT_UNDERSTAND)
    finally:
        server.stop(grace_seconds=2.0)
        store.close()
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3, [r.getMessage() for r in refused]

"""Honest C-STORE statuses: data the node cannot read back is refused and never stored.

Every malformed data set of issue #12 is sent as it is (a raw-socket peer, so nothing fixes the
bytes on the way), then what the store holds is read back fully by pydicom and by DCMTK's dcmdump.
"""

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from dicom_node.config import Settings
from dicom_node.ingest.scp import IngestServer, start_ingest
from dicom_node.ingest.status import StoreStatus
from dicom_node.store import InstanceStore
from tests.conftest import require_tool
from tests.factories import ct_dataset
from tests.ingest.attacker import store_bytes
from tests.malformed import body, malformed_cases, well_formed_encapsulated


class RecordingAudit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


@pytest.fixture
def audit() -> RecordingAudit:
    return RecordingAudit()


@pytest.fixture
def audited_node(settings: Settings, store: InstanceStore, audit: RecordingAudit) -> Iterator[IngestServer]:
    server = start_ingest(settings, store, audit)
    yield server
    server.stop(grace_seconds=2.0)


def _with_file_meta_inside(transfer_syntax_claimed: str) -> tuple[Any, bytes]:
    """A CT whose data set starts with (0002,0010) claiming another transfer syntax."""
    ds = ct_dataset(size=64)
    uid = transfer_syntax_claimed.encode() + b"\x00" * (len(transfer_syntax_claimed) % 2)
    group2 = b"\x02\x00\x10\x00UI" + len(uid).to_bytes(2, "little") + uid
    return ds, group2 + body(ds)


def _read_fully(path: Path) -> None:
    ds = dcmread(path)
    for element in ds.iterall():
        _ = element.value


def test_malformed_data_sets_are_refused_and_only_readable_files_are_stored(
    audited_node: IngestServer, store: InstanceStore, audit: RecordingAudit
) -> None:
    port = audited_node.port
    for case in malformed_cases():
        status, comment = store_bytes(port, CTImageStorage, case.sop_instance_uid, case.transfer_syntax,
                                       case.data)
        assert status == StoreStatus.CANNOT_UNDERSTAND, (case.name, hex(status), comment)
        assert case.reason in comment, (case.name, comment)
    assert not list((store.data_dir / "tmp").iterdir())
    assert not list(store.files.instances.rglob("*.dcm"))

    good = [(ct_dataset(size=64), ExplicitVRLittleEndian), (ct_dataset(size=64), ImplicitVRLittleEndian)]
    sent = [(ds, syntax, body(ds, syntax)) for ds, syntax in good]
    jpeg = ct_dataset(size=64)
    sent.append((jpeg, JPEGBaseline8Bit, well_formed_encapsulated(jpeg, b"\xff\xd8" + bytes(64) + b"\xff\xd9")))
    for ds, syntax, data in sent:
        assert store_bytes(port, CTImageStorage, ds.SOPInstanceUID, syntax, data) == (0, "")

    stored = sorted(store.files.instances.rglob("*.dcm"))
    assert len(stored) == len(sent)
    dcmdump = require_tool("dcmdump", "dcmtk")
    for path in stored:
        _read_fully(path)
        run = subprocess.run([dcmdump, "-q", str(path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "E:" not in run.stdout + run.stderr, (path.name, run.stderr)


def test_file_meta_inside_the_data_set_is_left_out_and_audited(
    audited_node: IngestServer, store: InstanceStore, audit: RecordingAudit
) -> None:
    ds, data = _with_file_meta_inside(ImplicitVRLittleEndian)
    status = store_bytes(audited_node.port, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, data)
    assert status == (0, "")
    record = store.index.get(ds.SOPInstanceUID)
    assert record is not None
    stored = dcmread(store.path_of(record))
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # the node's meta, not the peer's
    assert not [e for e in stored if e.tag.group == 0x0002]
    assert stored.PixelData == ds.PixelData and stored.Modality == "CT"
    events = [fields for name, fields in audit.events if name == "file_meta_stripped"]
    assert events == [{"study_instance_uid": ds.StudyInstanceUID, "sop_instance_uid": ds.SOPInstanceUID,
                       "calling_ae_title": "ATTACKER", "tags": ["(0002,0010)"]}]
    assert "PHANTOM" not in repr(audit.events)  # UIDs only, never the patient's name or ID
    dcmdump = require_tool("dcmdump", "dcmtk")
    run = subprocess.run([dcmdump, "-q", str(store.path_of(record))], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "E:" not in run.stdout + run.stderr

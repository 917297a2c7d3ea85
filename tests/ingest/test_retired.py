"""Retired storage classes that older modalities still send are accepted and stored; every
presentation context the node refuses is logged (WARNING) and audited with its SOP class."""

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.config import Settings
from dicom_node.ingest.scp import RETIRED_STORAGE, IngestServer, build_ae, start_ingest
from dicom_node.ingest.status import StoreStatus
from dicom_node.store import InstanceStore
from tests.encode.oddities import NM_RETIRED, ODDITIES, US_RETIRED
from tests.factories import new_uid
from tests.ingest.test_scp import association

US_MULTI_FRAME_RETIRED = "1.2.840.10008.5.1.4.1.1.3"
UNKNOWN_CLASS = "1.2.826.0.1.3680043.10.1543.99.1"  # a private class nobody supports


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def refused_in(audit: Recorder) -> list[str]:
    return [fields["sop_class_uid"] for event, fields in audit.events if event == "presentation_context_refused"]


@pytest.fixture
def audited(settings: Settings, store: InstanceStore) -> Iterator[tuple[IngestServer, Recorder]]:
    audit = Recorder()
    server = start_ingest(settings, store, audit)
    yield server, audit
    server.stop(grace_seconds=2.0)


def test_the_retired_storage_classes_of_the_standard_are_supported(settings: Settings) -> None:
    assert {US_RETIRED, US_MULTI_FRAME_RETIRED, NM_RETIRED} <= set(RETIRED_STORAGE)
    assert len(RETIRED_STORAGE) >= 18 and all(uid.is_retired for uid in RETIRED_STORAGE)
    supported = {cx.abstract_syntax for cx in build_ae(settings).supported_contexts}
    assert set(RETIRED_STORAGE) <= supported


def test_retired_classes_are_stored_and_a_refused_context_is_logged_and_audited(
    audited: tuple[IngestServer, Recorder], store: InstanceStore, caplog: pytest.LogCaptureFixture
) -> None:
    server, audit = audited
    sources = [ODDITIES["palette-retired-us"](), ODDITIES["retired-nm"]()]
    sources[1].SOPInstanceUID = sources[1].file_meta.MediaStorageSOPInstanceUID = new_uid()  # same phantom
    contexts = [(ds.SOPClassUID, [ExplicitVRLittleEndian]) for ds in sources]
    contexts.append((UNKNOWN_CLASS, [ExplicitVRLittleEndian]))
    with caplog.at_level(logging.WARNING, logger="dicom_node.ingest.scp"), \
            association(server.port, contexts=contexts) as assoc:
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [UNKNOWN_CLASS]
        statuses = [int(assoc.send_c_store(ds).Status) for ds in sources]
    assert statuses == [StoreStatus.SUCCESS] * 2
    for ds in sources:
        record = store.index.get(str(ds.SOPInstanceUID))
        assert record is not None and record.sop_class_uid == ds.SOPClassUID
    refused = [fields for event, fields in audit.events if event == "presentation_context_refused"]
    assert [fields["sop_class_uid"] for fields in refused] == [UNKNOWN_CLASS]
    assert refused[0]["calling_ae_title"] == "TEST_SCU" and refused[0]["reason"]
    warnings = [r.getMessage() for r in caplog.records if "refused presentation context" in r.getMessage()]
    assert len(warnings) == 1 and UNKNOWN_CLASS in warnings[0]


def test_an_association_whose_every_context_is_refused_is_not_silent(
    audited: tuple[IngestServer, Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    """The peer sees "no presentation context"; the node says which class it refused."""
    server, audit = audited
    with caplog.at_level(logging.WARNING, logger="dicom_node.ingest.scp"), \
            association(server.port, contexts=[(UNKNOWN_CLASS, [ExplicitVRLittleEndian])]) as assoc:
        assert not assoc.is_established
    deadline = time.monotonic() + 10  # the acceptor's thread records after it has answered
    while time.monotonic() < deadline and not refused_in(audit):
        time.sleep(0.01)
    assert refused_in(audit) == [UNKNOWN_CLASS]
    assert any(UNKNOWN_CLASS in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_the_conformance_statement_lists_the_retired_classes() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "conformance.md").read_text()
    for uid in RETIRED_STORAGE:
        assert f"| {uid} |" in text, uid.name

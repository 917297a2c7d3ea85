"""The Q/R handlers: the information model is honoured,
retrieves audit the studies they sent and refusals are audited, failures log no identifier
value, and answers with binary return keys make pydicom warn of nothing."""

import logging
import warnings
from typing import Any

import pytest
from pydicom import Dataset

from dicom_node.config import Settings
from dicom_node.query.match import find
from dicom_node.query.scp import handle_find, handle_get, handle_move
from dicom_node.query.status import QueryStatus
from dicom_node.store import InstanceStore
from tests.query import test_scp
from tests.query.test_scp import ARCHIVE, STUDY, FakeEvent, code, only_peer, step

store = test_scp.store  # the fixture: four results of one study

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


class Recorded:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def test_patient_level_is_refused_under_study_root_and_patient_root_answers_the_patient_id(
        store: InstanceStore) -> None:
    patient = {"QueryRetrieveLevel": "PATIENT", "PatientID": ""}
    event = FakeEvent(patient)
    [answer] = step(event, handle_find(event, store, only_peer, "XAI_NODE"))
    assert code(answer) == QueryStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    get = FakeEvent({"QueryRetrieveLevel": "PATIENT", "PatientID": "X"}, sop_class=STUDY_ROOT_GET)
    answers = step(get, handle_get(get, store, only_peer))
    assert code(answers[1]) == QueryStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    event = FakeEvent(patient, sop_class=PATIENT_ROOT_FIND)
    assert code(step(event, handle_find(event, store, only_peer, "XAI_NODE"))[0]) == QueryStatus.PENDING
    series = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": STUDY, "SeriesInstanceUID": ""}
    rooted = FakeEvent(series, sop_class=PATIENT_ROOT_FIND)
    [(_, answer)] = step(rooted, handle_find(rooted, store, only_peer, "XAI_NODE"))
    assert "PatientID" in answer
    plain = FakeEvent(series)
    [(_, answer)] = step(plain, handle_find(plain, store, only_peer, "XAI_NODE"))
    assert "PatientID" not in answer


def test_retrieves_audit_their_studies_and_refusals_are_audited(store: InstanceStore) -> None:
    audit = Recorded()
    get = FakeEvent({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY})
    step(get, handle_get(get, store, only_peer, audit))
    [(event, fields)] = audit.events
    assert event == "retrieve" and fields["study_instance_uids"] == [STUDY] and fields["instances"] == 4
    audit.events.clear()
    stranger = FakeEvent({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY}, calling="STRANGER")
    step(stranger, handle_find(stranger, store, only_peer, "XAI_NODE", audit))
    wild = FakeEvent({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "*"})
    step(wild, handle_get(wild, store, only_peer, audit))
    nowhere = FakeEvent({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY}, move_destination="NOWHERE")
    step(nowhere, handle_move(nowhere, store, only_peer, [ARCHIVE], audit))
    assert [(e, f["service"], f["reason"]) for e, f in audit.events] == [
        ("query_refused", "C-FIND", "not_authorized"), ("query_refused", "C-GET", "identifier"),
        ("query_refused", "C-MOVE", "move_destination_unknown")]


def test_a_failed_query_logs_no_identifier_value(store: InstanceStore, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(sql: str, params: Any) -> list[Any]:
        raise RuntimeError(f"index failed on {params!r}")  # as sqlite3 errors may quote values

    monkeypatch.setattr(store.index, "find", broken)
    caplog.set_level(logging.DEBUG)
    for handler in (handle_find, handle_get):
        event = FakeEvent({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY,
                           "PatientName": "Zyxwvut^Secretname", "PatientID": "SECRETID42"})
        args = (store, only_peer, "XAI_NODE") if handler is handle_find else (store, only_peer)
        answers = step(event, handler(event, *args))  # type: ignore[operator]
        assert code(answers[-1]) == QueryStatus.UNABLE_TO_PROCESS
    assert "RuntimeError" in caplog.text
    assert "Secretname" not in caplog.text and "SECRETID42" not in caplog.text


def test_binary_return_keys_make_no_warning(store: InstanceStore) -> None:
    query = find({"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": STUDY, "SOPInstanceUID": "", "Rows": "",
                  "LargestImagePixelValue": "", "PixelData": "", "ReferencedSOPSequence": ""})
    rows = store.index.find(query.sql, query.params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        answers = [query.dataset(row) for row in rows]
    assert len(answers) == 4 and all(isinstance(a, Dataset) and a.Rows is None for a in answers)


def test_pynetdicom_logs_no_identifier(settings: Settings) -> None:
    from pynetdicom import _config

    from dicom_node.ingest.scp import build_ae

    build_ae(settings)
    assert not _config.LOG_REQUEST_IDENTIFIERS and not _config.LOG_RESPONSE_IDENTIFIERS


def test_move_contexts_one_transfer_syntax_per_compressed_context_within_128() -> None:
    from dicom_node.query.match import Stored
    from dicom_node.query.scp import move_contexts

    rle, explicit, implicit = "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
    rows = [Stored("a", "1.2.3", "2.25.1", rle, STUDY), Stored("b", "1.2.3", "2.25.2", explicit, STUDY),
            Stored("c", "1.2.3", "2.25.3", implicit, STUDY)]
    contexts = {(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in move_contexts(rows)}
    assert contexts == {("1.2.3", (rle,)), ("1.2.3", (explicit, implicit))}
    many = [Stored(str(n), f"1.2.{n}", f"2.25.{n}", rle, STUDY) for n in range(100)]
    capped = move_contexts(many + many[:10])
    assert len(capped) == 128
    assert {cx.abstract_syntax for cx in capped if cx.transfer_syntax == [rle]} == {f"1.2.{n}" for n in range(100)}

"""The Q/R handlers stepped one answer at a time: Cancel ends C-FIND, C-GET and C-MOVE at the next
answer; the query role is checked first; an unknown move destination, a missing unique key and
an unreadable file each get their honest answer."""

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom import Dataset

from dicom_node.config import Destination
from dicom_node.phantoms import render, to_dataset
from dicom_node.query.match import Stored
from dicom_node.query.scp import MoveRefused, handle_find, handle_get, handle_move, move_destination
from dicom_node.query.status import QueryStatus
from dicom_node.store import InstanceStore
from tests.factories import new_uid

STUDY = "2.25.4242"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
ARCHIVE = Destination(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=104)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[InstanceStore]:
    store = InstanceStore(tmp_path / "var")
    series = new_uid()
    for seed in range(4):
        ds = to_dataset(render(seed, 32), study_uid=STUDY, series_uid=series)
        ds.InstanceNumber = seed + 1
        store.save_result(ds)
    yield store
    store.close()


class FakeEvent:
    """What the handlers read of a pynetdicom event; cancelled once ``cancel_after`` answers went."""

    def __init__(self, identifier: dict[str, str], calling: str = "PEER", cancel_after: int | None = None,
                 move_destination: str = "", sop_class: str = STUDY_ROOT_FIND) -> None:
        self.identifier = Dataset()
        for keyword, value in identifier.items():
            setattr(self.identifier, keyword, value)
        self.request = SimpleNamespace(AffectedSOPClassUID=sop_class)
        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title=calling, address="127.0.0.1"))
        self.move_destination = move_destination
        self.cancel_after = cancel_after
        self.answers = 0

    @property
    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and self.answers >= self.cancel_after


def step(event: FakeEvent, answers: Iterator[Any]) -> list[Any]:
    out = []
    for answer in answers:
        out.append(answer)
        if isinstance(answer, tuple) and answer and answer[0] == QueryStatus.PENDING:
            event.answers += 1
    return out


def only_peer(calling: str, address: str) -> bool:
    return calling == "PEER"


def code(answer: Any) -> int:
    status = answer[0]
    return int(status.Status) if isinstance(status, Dataset) else int(status)


def test_cancel_ends_a_find_a_get_and_a_move_at_the_next_answer(store: InstanceStore) -> None:
    find = FakeEvent({"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": STUDY, "SOPInstanceUID": ""},
                     cancel_after=2)
    answers = step(find, handle_find(find, store, only_peer, "XAI_NODE"))
    assert [code(a) for a in answers] == [QueryStatus.PENDING] * 2 + [QueryStatus.CANCEL]
    get = FakeEvent({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY}, cancel_after=1)
    answers = step(get, handle_get(get, store, only_peer))
    assert answers[0] == 4 and [code(a) for a in answers[1:]] == [QueryStatus.PENDING, QueryStatus.CANCEL]
    assert isinstance(answers[1][1], Dataset)  # the instance itself, for the C-STORE sub-operation
    move = FakeEvent({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY}, cancel_after=3,
                     move_destination="ARCHIVE")
    answers = step(move, handle_move(move, store, only_peer, [ARCHIVE]))
    assert answers[0][:2] == ("127.0.0.1", 104) and answers[0][2]["contexts"]
    assert answers[1] == 4 and [code(a) for a in answers[2:]] == [QueryStatus.PENDING] * 3 + [QueryStatus.CANCEL]


def test_without_cancel_every_match_and_instance_is_answered(store: InstanceStore) -> None:
    find = FakeEvent({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "RetrieveAETitle": ""})
    [(pending, answer)] = step(find, handle_find(find, store, only_peer, "XAI_NODE"))
    assert pending == QueryStatus.PENDING and answer.RetrieveAETitle == "XAI_NODE"
    get = FakeEvent({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY})
    answers = step(get, handle_get(get, store, only_peer))
    assert answers[0] == 4 and [code(a) for a in answers[1:]] == [QueryStatus.PENDING] * 4


def test_the_query_role_is_checked_first(store: InstanceStore) -> None:
    identifier = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY}
    stranger = FakeEvent(identifier, calling="STRANGER")
    [answer] = step(stranger, handle_find(stranger, store, only_peer, "XAI_NODE"))
    assert code(answer) == QueryStatus.NOT_AUTHORIZED
    answers = step(stranger, handle_get(stranger, store, only_peer))
    assert answers[0] == 1 and code(answers[1]) == QueryStatus.NOT_AUTHORIZED
    stranger.move_destination = "ARCHIVE"
    with pytest.raises(MoveRefused):
        next(handle_move(stranger, store, only_peer, [ARCHIVE]))  # pynetdicom answers 0xC514


def test_unknown_destination_missing_unique_key_and_unreadable_file(store: InstanceStore) -> None:
    move = FakeEvent({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY}, move_destination="NOWHERE")
    assert step(move, handle_move(move, store, only_peer, [ARCHIVE])) == [(None, None)]  # 0xA801
    get = FakeEvent({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": STUDY})
    answers = step(get, handle_get(get, store, only_peer))
    assert answers[0] == 1 and code(answers[1]) == QueryStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    bad = FakeEvent({"QueryRetrieveLevel": "PLANET"})
    [answer] = step(bad, handle_find(bad, store, only_peer, "XAI_NODE"))
    assert code(answer) == QueryStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    first = sorted((store.data_dir / "results").rglob("*.dcm"))[0]
    first.unlink()
    get = FakeEvent({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY})
    answers = step(get, handle_get(get, store, only_peer))
    sent = [a[1] for a in answers[1:]]
    assert sum(isinstance(s, Stored) for s in sent) == 1 and sum(isinstance(s, Dataset) for s in sent) == 3


def test_a_move_destination_named_by_two_entries_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """A plain and a TLS route to one PACS under one AE title: a C-MOVE must not pick one blindly."""
    plain = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242)
    tls = Destination(name="pacs-tls", ae_title="ORTHANC", host="127.0.0.1", port=4243, tls=True)
    other = Destination(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=104)
    assert move_destination([plain, other], "ORTHANC") is plain
    with caplog.at_level("WARNING"):
        assert move_destination([plain, tls, other], "ORTHANC") is None
    assert "pacs, pacs-tls" in caplog.text
    assert move_destination([plain, tls, other], "ARCHIVE") is other


def test_a_move_whose_tls_handshake_failed_logs_why(store: InstanceStore, caplog: pytest.LogCaptureFixture) -> None:
    class Context:  # what dicom_node.tls.client_context gives, after a refused handshake
        failure = "certificate verify failed: unable to get local issuer certificate"

    secure = Destination(name="pacs-tls", ae_title="ARCHIVE", host="127.0.0.1", port=2762, tls=True)
    move = FakeEvent({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY}, move_destination="ARCHIVE")
    moving = handle_move(move, store, only_peer, [secure], tls_for=lambda destination: (Context(), "pacs"))
    host, port, options = next(moving)
    assert (host, port) == ("127.0.0.1", 2762)
    assert options["tls_args"][1] == "pacs"
    assert next(moving) == 4  # the sub-operation count: pynetdicom associates after it
    with caplog.at_level("WARNING"):
        moving.close()  # pynetdicom drops the generator when that association fails
    assert "C-MOVE to pacs-tls: TLS handshake failed: certificate verify failed" in caplog.text

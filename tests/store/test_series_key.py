"""A series is its study and its Series Instance UID together: two studies (two patients) that
share a Series Instance UID are two series; an instance that moves leaves no empty record behind."""

import logging
from typing import Any

import pytest

from dicom_node.store import InstanceStore, SeriesKey
from tests.factories import ct_dataset, new_uid
from tests.store.test_store import put


class Events:
    """An audit sink that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event]


def patient(ds: Any, name: str) -> Any:
    ds.PatientName, ds.PatientID = f"{name}^TEST", f"ID-{name}"
    return ds


@pytest.fixture
def audited(tmp_path: Any) -> Any:
    events = Events()
    store = InstanceStore(tmp_path / "data", audit=events)
    yield store, events
    store.close()


def test_two_studies_sharing_a_series_uid_are_two_series_and_it_is_audited_once(
    audited: tuple[InstanceStore, Events], caplog: pytest.LogCaptureFixture
) -> None:
    store, events = audited
    shared = new_uid()
    alpha_study, beta_study = new_uid(), new_uid()
    alpha = [patient(ct_dataset(study=alpha_study, series=shared), "ALPHA") for _ in range(2)]
    beta = [patient(ct_dataset(study=beta_study, series=shared), "BETA") for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="dicom_node.store"):
        for ds in (alpha[0], beta[0], alpha[1], beta[1]):  # interleaved, as two associations send
            put(store, ds)
    a_key = SeriesKey(str(alpha[0].StudyInstanceUID), shared)
    b_key = SeriesKey(str(beta[0].StudyInstanceUID), shared)
    assert sorted(s.key for s in store.index.series()) == sorted([a_key, b_key])
    assert {s.instance_count for s in store.index.series()} == {2}
    assert [r.sop_instance_uid for r in store.index.instances(a_key)] == [ds.SOPInstanceUID for ds in alpha]
    assert [r.sop_instance_uid for r in store.index.instances(b_key)] == [ds.SOPInstanceUID for ds in beta]
    assert store.index.counts() == (2, 2, 4)
    # the second study's first instance is reported, once, with UIDs only
    [event] = events.named("series_uid_in_several_studies")
    assert event == {"study_instance_uid": b_key.study_instance_uid, "series_instance_uid": shared,
                     "other_study_instance_uids": [a_key.study_instance_uid]}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and shared in warnings[0].getMessage()
    text = caplog.text + repr(events.events)
    assert "ALPHA" not in text and "BETA" not in text


def test_a_moved_instance_leaves_no_empty_series_or_study(audited: tuple[InstanceStore, Events]) -> None:
    store, events = audited
    old = ct_dataset()
    put(store, old)
    moved = ct_dataset(study=new_uid(), series=new_uid(), sop=old.SOPInstanceUID, seed=3)
    put(store, moved)
    [series] = store.index.series()
    assert series.key == SeriesKey(moved.StudyInstanceUID, moved.SeriesInstanceUID)
    assert store.index.series(old.StudyInstanceUID) == []
    assert store.index.counts() == (1, 1, 1)
    [event] = events.named("instance_moved_to_another_study")
    assert event["previous_study_instance_uid"] == old.StudyInstanceUID
    assert event["study_instance_uid"] == moved.StudyInstanceUID


def test_a_series_that_loses_an_instance_is_marked_changed(audited: tuple[InstanceStore, Events]) -> None:
    store, _ = audited
    first = ct_dataset()
    put(store, first)
    second = put(store, ct_dataset(study=first.StudyInstanceUID, series=first.SeriesInstanceUID))
    other = put(store, ct_dataset())  # another study, stored later
    [before] = store.index.series(first.StudyInstanceUID)
    assert before.change_seq < store.index.series(other.study_instance_uid)[0].change_seq
    put(store, ct_dataset(sop=second.sop_instance_uid, study=other.study_instance_uid,
                          series=other.series_instance_uid))
    [after] = store.index.series(first.StudyInstanceUID)
    assert after.instance_count == 1
    # a new change number, above every other series': the scheduler looks at it again
    assert after.change_seq == max(s.change_seq for s in store.index.series())
    assert store.index.counts() == (2, 2, 3)


def test_moving_within_a_study_keeps_the_study_and_drops_the_empty_series(
    audited: tuple[InstanceStore, Events]
) -> None:
    store, events = audited
    old = ct_dataset()
    keep = put(store, ct_dataset(study=old.StudyInstanceUID))  # the study has a second series
    put(store, old)
    put(store, ct_dataset(study=old.StudyInstanceUID, series=keep.series_instance_uid, sop=old.SOPInstanceUID))
    [series] = store.index.series(old.StudyInstanceUID)
    assert series.series_instance_uid == keep.series_instance_uid and series.instance_count == 2
    assert store.index.counts() == (1, 1, 2)
    assert events.named("instance_moved_to_another_study") == []

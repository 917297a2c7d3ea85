"""Matching: a retrieve never selects by wildcard or
with no condition; a study's counts, modalities and attributes come from all its records, inputs
and results, whatever keys were asked; the finer matching rules; paging and extra return keys."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset

from dicom_node.query.match import QueryError, find, retrieve
from dicom_node.store import InstanceStore
from tests.query.test_match import filled, run, uids
from tests.store.test_keys_migration import radiograph
from tests.store.test_store import put


@pytest.fixture
def store(tmp_path: Path) -> Iterator[InstanceStore]:
    store = filled(tmp_path)
    yield store
    store.close()


@pytest.mark.parametrize("identifier", [
    {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "*"},
    {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "2.25.*", "PatientID": "P1"},
    {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "2.25.?"},
    {"QueryRetrieveLevel": "PATIENT", "PatientID": "P*"},
    {"QueryRetrieveLevel": "PATIENT", "PatientID": "P1\\P2"},
    {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "*", "SeriesInstanceUID": "2.25.11"},
    {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": "*"},
])
def test_a_retrieve_by_wildcard_is_refused(store: InstanceStore, identifier: dict[str, str]) -> None:
    with pytest.raises(QueryError, match="wildcard"):
        retrieve(identifier)


def test_a_retrieve_by_unique_keys_and_uid_lists_still_selects(store: InstanceStore) -> None:
    def sops(identifier: dict[str, str]) -> list[object]:
        query = retrieve(identifier)
        assert " WHERE " in query.sql and "WHERE  " not in query.sql
        return [row[2] for row in store.index.find(query.sql, query.params)]

    assert sops({"QueryRetrieveLevel": "PATIENT", "PatientID": "P2"}) == ["2.25.311"]
    assert sops({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "2.25.2\\2.25.3"}) == ["2.25.211", "2.25.311"]


def test_a_study_s_counts_modalities_and_attributes_cover_inputs_and_results(tmp_path: Path) -> None:
    """Two CR inputs with a Study Description and an SR result without one, in one study: the
    answer is the same whichever key selected the study."""
    mixed = InstanceStore(tmp_path / "var")
    try:
        study = "2.25.77"
        for seed in (1, 2):
            ds = radiograph(seed, study, "MIX")
            ds.StudyDescription = "CHEST PA"
            put(mixed, ds)
        result = radiograph(3, study, "MIX")
        result.Modality, result.StudyDescription = "SR", ""
        mixed.save_result(result)
        asked = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "StudyDescription": "",
                 "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "", "ModalitiesInStudy": ""}
        answers = [run(mixed, find({**asked, **keys})) for keys in (
            {}, {"StudyDescription": "CHEST PA"}, {"StudyInstanceUID": study}, {"AccessionNumber": "ACC3"},
            {"PatientName": "mix^test"}, {"ModalitiesInStudy": "SR"})]
        for [answer] in answers:
            assert (answer.NumberOfStudyRelatedSeries, answer.NumberOfStudyRelatedInstances) == (3, 3)
            assert sorted(answer.ModalitiesInStudy) == ["CR", "SR"]
            assert answer.StudyDescription == "CHEST PA"
        [series] = run(mixed, find({"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": str(result.SeriesInstanceUID),
                                     "StudyDescription": "", "SeriesNumber": ""}))
        assert series.StudyDescription == "CHEST PA" and series.SeriesNumber == 3
    finally:
        mixed.close()


def test_person_names_ignore_trailing_empty_components_and_sql_wildcards_are_text(store: InstanceStore) -> None:
    assert uids(store, "PATIENT", "PatientID", PatientName="Doe^John^") == ["P1"]
    assert uids(store, "PATIENT", "PatientID", PatientName="doe^john^^=") == ["P1"]
    # SQL's LIKE wildcards in a name are plain characters: "_" is not "any one character"
    assert uids(store, "PATIENT", "PatientID", PatientName="D_e*") == []
    assert uids(store, "PATIENT", "PatientID", PatientName="Doe%*") == []
    assert uids(store, "PATIENT", "PatientID", PatientName="D?e*") == ["P1"]


def test_empty_value_and_multiple_value_matching(store: InstanceStore) -> None:
    # C.2.2.2.7: "" matches the records without a value
    assert uids(store, "STUDY", "StudyInstanceUID", StudyDate='""') == ["2.25.4"]
    # several values of a key that is not a UID: any of them
    assert uids(store, "SERIES", "SeriesInstanceUID", Modality="CT\\DX") == ["2.25.21", "2.25.31"]
    assert uids(store, "STUDY", "StudyInstanceUID", AccessionNumber="ACC2\\X_*") == ["2.25.2", "2.25.3"]
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.SeriesInstanceUID, ds.Modality = "SERIES", "", ["CR", "SR"]
    assert [str(a.SeriesInstanceUID) for a in run(store, find(ds))] == ["2.25.11", "2.25.12", "2.25.41"]


def test_time_bounds_of_any_precision_and_date_time_offsets(tmp_path: Path) -> None:
    timed = InstanceStore(tmp_path / "var")
    try:
        for n, (time, content) in enumerate([("1300", "20240105120000"), ("125959", "20240105120000-0500"),
                                              ("130001.5", "20240106")]):
            timed.index.put_result(f"results/x/{n}.dcm", "1.2.840.10008.1.2.1", 0.0, {
                "sop_instance_uid": f"2.25.9{n}", "study_instance_uid": f"2.25.8{n}", "series_instance_uid": "2.25.7",
                "study_time": time, "content_date": content[:8], "content_time": content[8:]})

        def studies(**keys: object) -> list[str]:
            return uids(timed, "STUDY", "StudyInstanceUID", **keys)

        assert studies(StudyTime="130000-") == ["2.25.80", "2.25.82"]  # a stored 1300 is 13:00
        assert studies(StudyTime="130000-130000") == ["2.25.80"]
        assert studies(StudyTime="-125959") == ["2.25.81"]
    finally:
        timed.close()


def test_date_time_ranges_are_not_utc_offsets() -> None:
    from dicom_node.query.match import _range

    assert _range("c", "DT", "20240105120000-20240106")[0] == "c != '' AND c >= ? AND c != '' AND substr(c, 1, 8) <= ?"
    assert _range("c", "DT", "20240105120000-0500")[0] == "substr(c, 1, 19) = ?"  # one value, an offset
    assert _range("c", "DT", "2023-2024")[1] == ["2023", "2024"]


def test_paging_extra_return_keys_and_patient_root(store: InstanceStore) -> None:
    every = uids(store, "STUDY", "StudyInstanceUID")
    page = run(store, find({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, limit=2, offset=1))
    assert [str(a.StudyInstanceUID) for a in page] == every[1:3]
    rest = run(store, find({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, offset=3))
    assert [str(a.StudyInstanceUID) for a in rest] == every[3:]
    [answer] = run(store, find({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "2.25.3"},
                               include=["AccessionNumber"]))
    assert answer.AccessionNumber == "X_3%" and "PatientID" not in answer
    [everything] = run(store, find({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "2.25.3"}, include=["all"]))
    assert everything.PatientName == "Roe^Jane" and everything.StudyDate == "20231231" and "Modality" not in everything
    [rooted] = run(store, find({"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": "2.25.31"}, patient_root=True))
    assert rooted.PatientID == "P2"

"""The matching module on a real index: every PS3.4 C.2.2.2 matching kind, the case rules, the
levels' grouping and derived keys, and the retrieve query."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset

from dicom_node.query.match import Find, QueryError, find, retrieve
from dicom_node.store import InstanceStore
from dicom_node.store.keys import Level

SR = "1.2.840.10008.5.1.4.1.1.88.34"
CR = "1.2.840.10008.5.1.4.1.1.1"
FINDINGS = {"CodeValue": "126000", "CodingSchemeDesignator": "DCM", "CodeMeaning": "Imaging Measurement Report"}

#: (patient, name, study, date, time, accession, series, modality, number, sop, class, concept)
ROWS = [
    ("P1", "Doe^John", "2.25.1", "20240105", "101500", "ACC1", "2.25.11", "CR", 1, "2.25.111", CR, None),
    ("P1", "Doe^John", "2.25.1", "20240105", "101500", "ACC1", "2.25.11", "CR", 1, "2.25.112", CR, None),
    ("P1", "Doe^John", "2.25.1", "20240105", "101500", "ACC1", "2.25.12", "SR", 900, "2.25.121", SR, FINDINGS),
    ("P1", "Doe^John", "2.25.2", "20240301", "130030", "ACC2", "2.25.21", "CT", 2, "2.25.211", CR, None),
    ("P2", "Roe^Jane", "2.25.3", "20231231", "235959", "X_3%", "2.25.31", "DX", 1, "2.25.311", CR, None),
    ("P3", "Müller^Jürgen", "2.25.4", "", "", "ACC4", "2.25.41", "SR", 900, "2.25.411", SR,
     {"CodeValue": "999", "CodingSchemeDesignator": "99X", "CodeMeaning": "Other"}),
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[InstanceStore]:
    store = filled(tmp_path)
    yield store
    store.close()


def filled(tmp_path: Path) -> InstanceStore:
    """A store whose index holds :data:`ROWS` (as results)."""
    store = InstanceStore(tmp_path / "var")
    for n, (patient, name, study, date, time, accession, series, modality, number, sop, sop_class,
            concept) in enumerate(ROWS):
        keys: dict[str, object] = {
            "patient_id": patient, "patient_name": name, "study_instance_uid": study, "study_date": date,
            "study_time": time, "accession_number": accession, "series_instance_uid": series,
            "modality": modality, "series_number": number, "instance_number": n, "sop_instance_uid": sop,
            "sop_class_uid": sop_class, "patient_sex": "O", "verification_flag": "UNVERIFIED" if concept else "",
        }
        if concept:
            keys.update(concept_code_value=concept["CodeValue"], concept_coding_scheme=concept["CodingSchemeDesignator"],
                        concept_code_meaning=concept["CodeMeaning"])
        store.index.put_result(f"results/{study}/{series}/{sop}.dcm", "1.2.840.10008.1.2.1", float(n), keys)
    return store


def run(store: InstanceStore, query: Find) -> list[Dataset]:
    return [query.dataset(row) for row in store.index.find(query.sql, query.params)]


def uids(store: InstanceStore, level: str, keyword: str, **keys: object) -> list[str]:
    found = run(store, find({"QueryRetrieveLevel": level, keyword: "", **keys}))
    return [str(ds.get(keyword)) for ds in found]


def test_single_value_universal_and_list_matching(store: InstanceStore) -> None:
    assert uids(store, "STUDY", "StudyInstanceUID", PatientID="P1") == ["2.25.1", "2.25.2"]
    assert uids(store, "STUDY", "StudyInstanceUID") == ["2.25.1", "2.25.2", "2.25.3", "2.25.4"]  # universal
    assert uids(store, "STUDY", "StudyInstanceUID", AccessionNumber="ACC2") == ["2.25.2"]
    assert uids(store, "STUDY", "StudyInstanceUID", StudyInstanceUID="2.25.3\\2.25.1\\9.9") == ["2.25.1", "2.25.3"]
    assert uids(store, "IMAGE", "SOPInstanceUID", SeriesNumber="900") == ["2.25.121", "2.25.411"]
    assert uids(store, "STUDY", "StudyInstanceUID", PatientID="P1'; DROP TABLE instance_keys; --") == []
    assert len(uids(store, "IMAGE", "SOPInstanceUID")) == len(ROWS)  # the quote above did nothing


def test_wildcards_and_case_rules(store: InstanceStore) -> None:
    # PN: case-insensitive; other VRs: case-sensitive
    assert uids(store, "PATIENT", "PatientID", PatientName="doe*") == ["P1"]
    assert uids(store, "PATIENT", "PatientID", PatientName="DOE^JOHN") == ["P1"]
    assert uids(store, "PATIENT", "PatientID", PatientName="R?e^*") == ["P2"]
    assert uids(store, "PATIENT", "PatientID", PatientName="Müller*") == ["P3"]
    assert uids(store, "STUDY", "StudyInstanceUID", AccessionNumber="acc*") == []
    assert uids(store, "STUDY", "StudyInstanceUID", AccessionNumber="ACC?") == ["2.25.1", "2.25.2", "2.25.4"]
    # SQL's own wildcards are plain characters in DICOM
    assert uids(store, "STUDY", "StudyInstanceUID", AccessionNumber="X_3%") == ["2.25.3"]
    assert uids(store, "STUDY", "StudyInstanceUID", AccessionNumber="X_*") == ["2.25.3"]
    assert uids(store, "STUDY", "StudyInstanceUID", AccessionNumber="*") == ["2.25.1", "2.25.2", "2.25.3", "2.25.4"]


def test_date_and_time_ranges(store: InstanceStore) -> None:
    def studies(**keys: object) -> list[str]:
        return uids(store, "STUDY", "StudyInstanceUID", **keys)

    assert studies(StudyDate="20240101-20240201") == ["2.25.1"]
    assert studies(StudyDate="20240105") == ["2.25.1"]
    assert studies(StudyDate="20240105-") == ["2.25.1", "2.25.2"]
    assert studies(StudyDate="-20240105") == ["2.25.1", "2.25.3"]  # no date: no match in a range
    assert studies(StudyTime="1300-1300") == ["2.25.2"]  # 13:00:30 is within 13:00
    assert studies(StudyTime="-1015") == ["2.25.1"]


def test_concept_name_code_sequence_matching_finds_the_ai_reports(store: InstanceStore) -> None:
    query = {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "2.25.1", "SOPInstanceUID": "",
             "ConceptNameCodeSequence": [{"CodeValue": "126000", "CodingSchemeDesignator": "DCM"}],
             "VerificationFlag": ""}
    [report] = run(store, find(query))
    assert report.SOPInstanceUID == "2.25.121" and report.VerificationFlag == "UNVERIFIED"
    assert report.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurement Report"
    # an empty item asks for the sequence back; a dataset identifier works like a mapping
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.SOPInstanceUID, ds.PatientID, ds.PatientName = "IMAGE", "", "P3", ""
    ds.ConceptNameCodeSequence = [Dataset()]
    [other] = run(store, find(ds))
    assert other.ConceptNameCodeSequence[0].CodeValue == "999" and other.SpecificCharacterSet == "ISO_IR 192"
    cr = run(store, find({**query, "StudyInstanceUID": "2.25.2", "ConceptNameCodeSequence": [{}]}))
    assert [len(ds.ConceptNameCodeSequence) for ds in cr] == [0]


def test_levels_group_and_count_and_leave_lower_keys_empty(store: InstanceStore) -> None:
    [study] = run(store, find({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "2.25.1",
                                "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "",
                                "ModalitiesInStudy": "", "SOPInstanceUID": "", "PatientName": ""}))
    assert (study.NumberOfStudyRelatedSeries, study.NumberOfStudyRelatedInstances) == (2, 3)
    assert sorted(study.ModalitiesInStudy) == ["CR", "SR"] and study.SOPInstanceUID == ""
    assert study.PatientName == "Doe^John" and study.QueryRetrieveLevel == "STUDY"
    assert uids(store, "STUDY", "StudyInstanceUID", ModalitiesInStudy="CT\\DX") == ["2.25.2", "2.25.3"]
    [series] = run(store, find({"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": "2.25.11",
                                 "NumberOfSeriesRelatedInstances": ""}))
    assert series.StudyInstanceUID == "2.25.1" and series.NumberOfSeriesRelatedInstances == 2
    [patient] = run(store, find({"QueryRetrieveLevel": "PATIENT", "PatientID": "P1",
                                  "NumberOfPatientRelatedStudies": ""}))
    assert patient.NumberOfPatientRelatedStudies == 2
    # an image-level key at study level is not matched
    assert len(uids(store, "STUDY", "StudyInstanceUID", SOPInstanceUID="2.25.111")) == 4


def test_retrieve_selects_the_files_and_needs_the_unique_key(store: InstanceStore) -> None:
    query = retrieve({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "2.25.1", "SeriesInstanceUID": "2.25.11"})
    rows = store.index.find(query.sql, query.params)
    assert [row[2] for row in rows] == ["2.25.111", "2.25.112"]
    assert rows[0][0] == "results/2.25.1/2.25.11/2.25.111.dcm"
    with pytest.raises(QueryError, match="SeriesInstanceUID"):
        retrieve({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "2.25.1"})
    with pytest.raises(QueryError, match="Level"):
        find({"QueryRetrieveLevel": "FRAME"})
    with pytest.raises(QueryError, match="keyword"):
        find({"QueryRetrieveLevel": "STUDY", "NoSuchKeyword": ""})
    assert find({"QueryRetrieveLevel": "study"}).level is Level.STUDY


def test_a_multi_valued_key_comes_back_as_its_values(tmp_path: Path) -> None:
    """An index record holds a multi-valued attribute as DICOM writes it ("a\\b"): C-FIND
    answers its values, not one value holding a Python list's text."""
    from pydicom.uid import ExplicitVRLittleEndian

    from dicom_node.store.keys import key_values
    from tests.factories import ct_dataset

    ds = ct_dataset(seed=40)
    ds.ReferringPhysicianName = ["Doe^John", "Roe^Jane"]
    store = InstanceStore(tmp_path / "multi")
    try:
        keys = key_values(ds)
        store.index.put_result("results/x.dcm", ExplicitVRLittleEndian, 0.0, keys)
        [answer] = run(store, find({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID,
                                    "ReferringPhysicianName": ""}))
    finally:
        store.close()
    assert list(answer.ReferringPhysicianName) == ["Doe^John", "Roe^Jane"]

"""STUDY-level matching reads the store's ``study_summary``: its answers are those grouping every
record gave (:mod:`tests.store.summary_reference`), for studies whose records disagree, series
of several modalities, results among inputs, after re-stores and removals; a study matches when
any of its records matches each key, as before."""

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_node.query.match import find, retrieve
from dicom_node.store.index import Index
from dicom_node.store.keys import KEYS, Level
from tests.store.summary_reference import COLUMNS, grouped
from tests.store.summary_writes import step

#: Return keys of a STUDY-level answer -> the reference's column.
REFERENCE = {**{key.keyword: key.column for key in KEYS if key.column in COLUMNS},
             "ModalitiesInStudy": "modalities", "NumberOfStudyRelatedSeries": "series_count",
             "NumberOfStudyRelatedInstances": "instance_count"}
Record = dict[str, object]
SEARCHES: list[tuple[dict[str, str], Callable[[Record], bool], Callable[[Record], bool]]] = [
    ({}, lambda r: True, lambda r: True),
    ({"PatientID": "pat-2.25.3"}, lambda r: r["patient_id"] == "pat-2.25.3", lambda r: True),
    ({"PatientID": "pat-2.25.1*"}, lambda r: str(r["patient_id"] or "").startswith("pat-2.25.1"),
     lambda r: True),
    ({"ModalitiesInStudy": "SR\\SEG"}, lambda r: True, lambda r: r["modality"] in ("SR", "SEG")),
    ({"PatientName": "DOE*", "ModalitiesInStudy": "MR"},
     lambda r: str(r["patient_name"] or "").upper().startswith("DOE"), lambda r: r["modality"] == "MR"),
    ({"StudyDate": "-20240101"}, lambda r: bool(r["study_date"]) and str(r["study_date"]) <= "20240101",
     lambda r: True),
    ({"AccessionNumber": '""'}, lambda r: not r["accession_number"], lambda r: True),
]


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    index = Index(tmp_path / "index.sqlite", "NORMAL")
    rng = random.Random(11)
    studies = [f"2.25.{n}" for n in range(1, 31)]
    for n in range(500):
        step(index, rng, float(n), studies)
    yield index
    index.close()


@pytest.mark.parametrize("search", range(len(SEARCHES)))
def test_a_study_level_answer_is_the_grouped_records_answer(index: Index, search: int) -> None:
    identifier, matches, has_modality = SEARCHES[search]
    conn = index._conn
    names = [d[0] for d in conn.execute("SELECT * FROM instance_keys LIMIT 0").description]
    records = [dict(zip(names, row, strict=True)) for row in conn.execute("SELECT * FROM instance_keys")]
    reference = {row[0]: dict(zip(COLUMNS, row, strict=True)) for row in grouped(conn)}
    expected = sorted(str(study) for study in reference
                      if any(r["study_instance_uid"] == study and matches(r) for r in records)
                      and any(r["study_instance_uid"] == study and has_modality(r) for r in records))
    assert 0 < len(expected) < len(reference) or not identifier
    query = find({"QueryRetrieveLevel": "STUDY", **identifier}, include=["all", *REFERENCE])
    rows = index.find(query.sql, query.params)
    answers = [dict(zip(query.return_keys, row, strict=True)) for row in rows]
    assert [a["StudyInstanceUID"] for a in answers] == expected
    for answer in answers:
        study = reference[str(answer["StudyInstanceUID"])]
        assert {k: v for k, v in answer.items() if k in REFERENCE} == {
            k: study[column] for k, column in REFERENCE.items() if k in answer}
    paged = find({"QueryRetrieveLevel": "STUDY", **identifier}, limit=2, offset=1)
    assert [row[0] for row in index.find(paged.sql, paged.params)] == expected[1:3]


def test_a_series_level_answer_holds_its_study_s_attributes(index: Index) -> None:
    """Below STUDY level the study's attributes come from the same summary."""
    reference = {row[0]: dict(zip(COLUMNS, row, strict=True)) for row in grouped(index._conn)}
    query = find({"QueryRetrieveLevel": "SERIES", "StudyDate": "", "PatientName": "", "StudyDescription": ""},
                 level=Level.SERIES)
    rows = index.find(query.sql, query.params)
    assert rows
    for row in rows:
        answer = dict(zip(query.return_keys, row, strict=True))
        study = reference[str(answer["StudyInstanceUID"])]
        assert (answer["StudyDate"], answer["PatientName"], answer["StudyDescription"]) == (
            study["study_date"], study["patient_name"], study["study_description"])


def test_a_study_level_retrieve_with_modalities_in_study_runs(index: Index) -> None:
    """Modalities in Study does not narrow a retrieve (it names no records); its value used to
    be bound to the retrieve's SQL anyway, one parameter too many."""
    study = str(index.instances()[0].study_instance_uid)
    query = retrieve({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study, "ModalitiesInStudy": "CT"})
    assert query.params == (study,)
    assert index.find(query.sql, query.params)

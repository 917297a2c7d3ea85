"""QIDO-RS through dicomweb-client and plain HTTP: studies, series and instances at every level
and under their parents, match keys by keyword and tag, includefield, limit and offset,
fuzzymatching's warning, the Retrieve URL, and 400 for a bad key; inputs and results alike."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.uid import BasicTextSRStorage

from dicom_node.dicomweb import qido
from dicom_node.phantoms import write_study
from dicom_node.phantoms.cross_section import cross_section
from dicom_node.store.files import add_file_meta
from tests.dicomweb.serve import serve_dicomweb
from tests.dicomweb.syntaxes import ingest
from tests.factories import new_uid

CR_SEED, CT_SEED = 31, 32


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """Inputs: a CR study of 3 instances (ingested as C-STORE stores them); results: a CT study
    of 4 slices (saved as the pipeline saves its outputs)."""
    tmp = tmp_path_factory.mktemp("qido")
    cr = write_study(tmp / "cr", 3, CR_SEED, size=64)
    with serve_dicomweb(tmp / "data") as (url, ctx):
        for path in cr:
            ingest(ctx.store, path)
        ct = [cross_section(CT_SEED, "CT", 32, position).dataset for position in range(4)]
        for ds in ct:
            ctx.store.save_result(ds)
        first = dcmread(cr[0], stop_before_pixels=True)
        yield url, {"cr_study": first.StudyInstanceUID, "cr_series": first.SeriesInstanceUID,
                    "ct_study": ct[0].StudyInstanceUID, "ct_series": ct[0].SeriesInstanceUID}


def uids(results: list[dict], tag: str = "0020000D") -> list[str]:
    return [r[tag]["Value"][0] for r in results]


def test_studies_are_found_by_keyword_tag_wildcard_and_modalities(server: tuple[str, dict[str, str]]) -> None:
    url, ids = server
    client = DICOMwebClient(url=url)
    assert sorted(uids(client.search_for_studies())) == sorted([ids["cr_study"], ids["ct_study"]])
    assert uids(client.search_for_studies(search_filters={"PatientName": f"phantom^{CT_SEED}*"})) == [ids["ct_study"]]
    assert uids(client.search_for_studies(search_filters={"0020000D": ids["cr_study"]})) == [ids["cr_study"]]
    assert uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "CT"})) == [ids["ct_study"]]
    both = ",".join([ids["cr_study"], ids["ct_study"]])  # a list of UIDs, and of modalities
    assert sorted(uids(client.search_for_studies(search_filters={"StudyInstanceUID": both}))) == sorted(both.split(","))
    assert len(client.search_for_studies(search_filters={"ModalitiesInStudy": "MR,CR"})) == 1
    cr, = client.search_for_studies(search_filters={"PatientID": f"PHANTOM-{CR_SEED}"})
    assert cr["00201208"]["Value"] == [3] and cr["00201206"]["Value"] == [1]  # instances, series
    assert cr["00080061"]["Value"] == ["CR"] and cr["00100010"]["Value"] == [{"Alphabetic": f"PHANTOM^{CR_SEED}"}]
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []


def test_series_and_instances_at_every_level_and_under_their_parents(server: tuple[str, dict[str, str]]) -> None:
    url, ids = server
    client = DICOMwebClient(url=url)
    assert sorted(uids(client.search_for_series(), "0020000E")) == sorted([ids["cr_series"], ids["ct_series"]])
    ct, = client.search_for_series(ids["ct_study"])
    assert ct["0020000E"]["Value"] == [ids["ct_series"]] and ct["00201209"]["Value"] == [4]
    assert client.search_for_series(search_filters={"Modality": "CT"})[0]["0020000E"]["Value"] == [ids["ct_series"]]
    assert len(client.search_for_instances()) == 7
    assert len(client.search_for_instances(ids["cr_study"])) == 3
    slices = client.search_for_instances(ids["ct_study"], ids["ct_series"])
    assert [s["00200013"]["Value"][0] for s in slices] == [1, 2, 3, 4]
    assert client.search_for_instances(ids["ct_study"], ids["ct_series"], search_filters={"InstanceNumber": "2"})[0][
        "00200013"]["Value"] == [2]
    # a search for all instances answers the study's attributes too; one under a study need not
    assert "00100020" in client.search_for_instances()[0]
    assert "00100020" not in slices[0]


def test_limit_and_offset_page_through_the_matches_without_gaps(server: tuple[str, dict[str, str]]) -> None:
    url, _ = server
    client = DICOMwebClient(url=url)
    every = uids(client.search_for_instances(), "00080018")
    pages = [uids(client.search_for_instances(limit=3, offset=offset), "00080018") for offset in (0, 3, 6)]
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [uid for page in pages for uid in page] == every
    assert client.search_for_instances(offset=7) == []


def test_includefield_names_more_keys_by_keyword_or_tag_or_all(server: tuple[str, dict[str, str]]) -> None:
    url, ids = server
    client = DICOMwebClient(url=url)
    series, = client.search_for_series(ids["cr_study"], fields=["PatientName", "00080050"])
    assert series["00100010"]["Value"] == [{"Alphabetic": f"PHANTOM^{CR_SEED}"}] and "00080050" in series
    plain, = client.search_for_series(ids["cr_study"])
    assert "00100010" not in plain
    everything, = client.search_for_series(ids["cr_study"], fields=["all"])
    assert {"00100010", "00080020", "0008103E", "00201209"} <= set(everything)
    # repeated includefield parameters add up, as a comma list does
    answer = requests.get(f"{url}/studies/{ids['cr_study']}/series?includefield=PatientName&includefield=StudyID")
    assert {"00100010", "00200010"} <= set(answer.json()[0])


def test_includefield_of_a_key_the_index_does_not_hold_is_left_out(server: tuple[str, dict[str, str]]) -> None:
    """Present but empty would claim the instance has no value; the index just does not hold it."""
    url, ids = server
    for path, tag in (("/studies?includefield=BodyPartExamined", "00180015"),
                      ("/instances?includefield=Rows", "00280010"),
                      ("/studies?includefield=SOPInstanceUID", "00080018")):  # below the level
        answer = requests.get(url + path, timeout=30).json()
        assert answer and all(tag not in result for result in answer), path
    [study] = requests.get(f"{url}/studies?StudyInstanceUID={ids['cr_study']}&includefield=PatientSex",
                           timeout=30).json()
    assert "00100040" in study  # a key the index holds is included


def test_retrieve_url_names_this_nodes_wado_rs_resource(server: tuple[str, dict[str, str]]) -> None:
    url, ids = server
    study, = requests.get(f"{url}/studies", params={"StudyInstanceUID": ids["ct_study"]}).json()
    assert study["00081190"] == {"vr": "UR", "Value": [f"{url}/studies/{ids['ct_study']}"]}
    instance = requests.get(f"{url}/studies/{ids['ct_study']}/instances", params={"limit": "1"}).json()[0]
    retrieve_url = instance["00081190"]["Value"][0]
    assert retrieve_url == (f"{url}/studies/{ids['ct_study']}/series/{ids['ct_series']}/instances/"
                            f"{instance['00080018']['Value'][0]}")
    got = requests.get(retrieve_url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert got.status_code == 200 and got.headers["Content-Type"].startswith("multipart/related")


def test_fuzzymatching_is_answered_with_a_warning_and_literal_matching(server: tuple[str, dict[str, str]]) -> None:
    url, ids = server
    answer = requests.get(f"{url}/studies", params={"fuzzymatching": "true", "PatientName": f"PHANTOM^{CR_SEED}"})
    assert answer.status_code == 200 and uids(answer.json()) == [ids["cr_study"]]
    assert answer.headers["Content-Type"] == "application/dicom+json"
    assert answer.headers["Warning"].startswith("299 ") and "fuzzymatching parameter is not supported" in \
        answer.headers["Warning"]
    assert "Warning" not in requests.get(f"{url}/studies").headers


def test_no_match_is_200_with_an_empty_array(server: tuple[str, dict[str, str]]) -> None:
    url, _ = server
    answer = requests.get(f"{url}/series", params={"Modality": "MR"})
    assert answer.status_code == 200 and answer.json() == []


@pytest.mark.parametrize("query, reason", [
    ("/studies?NoSuchKeyword=1", "not a DICOM attribute"),
    ("/studies?SOPInstanceUID=1.2.3", "IMAGE level"),
    ("/studies?Rows=512", "not a supported match key"),
    ("/studies?limit=-1", "non-negative integer"),
    ("/studies?offset=x", "non-negative integer"),
    ("/studies?includefield=NotAKeyword", "not a DICOM attribute"),
    ("/studies/1.2.x/series", "not a valid UID"),
    ("/instances?ConceptNameCodeSequence.PatientName=x", "not a sequence key"),
])
def test_a_bad_key_or_level_is_400_with_its_reason(server: tuple[str, dict[str, str]], query: str,
                                                    reason: str) -> None:
    url, _ = server
    answer = requests.get(url + query)
    assert answer.status_code == 400 and reason in answer.text
    assert "Traceback" not in answer.text


def test_results_are_capped_with_a_warning_saying_more_exist(server: tuple[str, dict[str, str]],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = server
    monkeypatch.setattr(qido, "MAX_RESULTS", 5)
    capped = requests.get(f"{url}/instances")
    assert len(capped.json()) == 5 and "Additional results can be requested" in capped.headers["Warning"]
    asked = requests.get(f"{url}/instances", params={"limit": "5"})
    assert len(asked.json()) == 5 and "Warning" not in asked.headers  # the client's own limit


def test_a_sequence_key_matches_by_its_item_attribute(tmp_path: Path) -> None:
    report = Dataset()
    report.SOPClassUID, report.SOPInstanceUID = BasicTextSRStorage, new_uid()
    report.StudyInstanceUID, report.SeriesInstanceUID = new_uid(), new_uid()
    report.PatientID, report.Modality, report.ValueType = "PHANTOM-SR", "SR", "CONTAINER"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "126000", "DCM", \
        "Imaging Measurement Report"
    report.ConceptNameCodeSequence = [concept]
    add_file_meta(report)
    with serve_dicomweb(tmp_path) as (url, ctx):
        ctx.store.save_result(report)
        found = requests.get(f"{url}/instances", params={"ConceptNameCodeSequence.CodeValue": "126000"}).json()
        assert uids(found, "00080018") == [report.SOPInstanceUID]
        item = found[0]["0040A043"]["Value"][0]
        assert item["00080104"]["Value"] == ["Imaging Measurement Report"]
        assert requests.get(f"{url}/instances", params={"0040A043.00080100": "999"}).json() == []


def test_person_names_are_split_into_component_groups_and_values(tmp_path: Path) -> None:
    """PS3.18 F.2.2: "A=I=P" is Alphabetic, Ideographic and Phonetic; a multi-valued PN is one
    object per value."""
    from tests.factories import ct_dataset

    ds = ct_dataset(seed=41)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.ReferringPhysicianName = ["Doe^John", "Roe^Jane"]
    with serve_dicomweb(tmp_path / "data") as (url, ctx):
        ctx.store.save_result(ds)
        [study] = requests.get(url + "/studies", timeout=30).json()
    assert study["00100010"]["Value"] == [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎",
                                           "Phonetic": "やまだ^たろう"}]
    assert study["00080090"]["Value"] == [{"Alphabetic": "Doe^John"}, {"Alphabetic": "Roe^Jane"}]


@pytest.mark.parametrize(("accept", "expected"), [
    ("application/dicom+xml", 406), ('multipart/related; type="application/dicom+xml"', 406),
    ("text/html", 406), ("application/dicom+json", 200), ("application/json", 200), ("*/*", 200),
    ("application/*", 200), ("text/html, application/dicom+json;q=0.5", 200), (None, 200),
])
def test_qido_answers_406_unless_the_accept_header_allows_dicom_json(
        server: tuple[str, dict[str, str]], accept: str | None, expected: int) -> None:
    url, _ = server
    headers = {"Accept": accept} if accept is not None else {}
    response = requests.get(url + "/studies", headers=headers, timeout=30)
    assert response.status_code == expected, response.text
    if expected == 200:
        assert response.headers["Content-Type"].startswith("application/dicom+json")


def test_the_query_audit_names_the_studies_answered(tmp_path: Path) -> None:
    from tests.dicomweb.stow_helpers import RecordingAudit
    from tests.factories import ct_dataset

    audit = RecordingAudit()
    first, second = ct_dataset(seed=61), ct_dataset(seed=62)
    with serve_dicomweb(tmp_path / "data", audit=audit) as (url, ctx):
        for ds in (first, second):
            ctx.store.save_result(ds)
        assert len(requests.get(url + "/studies", timeout=30).json()) == 2
        assert len(requests.get(url + "/instances?PatientID=NOBODY", timeout=30).json()) == 0
    everything, nothing = audit.named("query")
    assert everything["study_instance_uids"] == sorted([first.StudyInstanceUID, second.StudyInstanceUID])
    assert everything["matches"] == 2 and nothing["study_instance_uids"] == []
    assert "PHANTOM" not in repr(audit.events)  # UIDs, never names or IDs

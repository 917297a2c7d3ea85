"""DCMTK ``findscu``, ``getscu`` and ``movescu`` query and retrieve the node's inputs and its
own results (SC, SR) at every level, with wildcard, range, list and sequence matching; a move
to an AE that is not a destination gets 0xA801; a peer without the query role is refused."""

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from tests.conftest import require_tool
from tests.peers.test_dcmtk import DCMTK_ENV
from tests.query.peers import QRNode, c_find, results_of, running_node

pytestmark = pytest.mark.peers
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33"}


@pytest.fixture(scope="module")
def qr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QRNode]:
    yield from running_node(tmp_path_factory.mktemp("qr"))


def dcmtk(program: str, qr: QRNode, args: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    path = require_tool(program, "dcmtk")
    output = [] if program == "movescu" else ["-od", str(out)]  # movescu receives nothing itself
    return subprocess.run([path, "-aec", "XAI_NODE", *output, *args, "127.0.0.1", str(qr.node.port)],
                          capture_output=True, text=True, timeout=120, env=DCMTK_ENV)


def findscu(qr: QRNode, tmp_path: Path, model: str, keys: dict[str, str]) -> list[Dataset]:
    out = tmp_path / f"find{len(list(tmp_path.iterdir()))}"
    result = dcmtk("findscu", qr, [model, "-X", *[a for k, v in keys.items() for a in ("-k", f"{k}={v}")]], out)
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_findscu_at_every_level_with_wildcard_range_list_and_sequence_matching(qr: QRNode, tmp_path: Path) -> None:
    s = qr.studies
    patients = findscu(qr, tmp_path, "-P", {"QueryRetrieveLevel": "PATIENT", "PatientName": "phantom^41*",
                                            "PatientID": "", "NumberOfPatientRelatedStudies": ""})
    assert [(p.PatientID, p.NumberOfPatientRelatedStudies) for p in patients] == [(s.patient["alpha"], 1)]
    by_range = findscu(qr, tmp_path, "-S", {"QueryRetrieveLevel": "STUDY", "StudyDate": "20240101-",
                                            "StudyInstanceUID": "", "ModalitiesInStudy": "",
                                            "NumberOfStudyRelatedInstances": ""})
    assert sorted(d.StudyInstanceUID for d in by_range) == sorted([s.uid["alpha"], s.uid["beta"]])
    alpha = next(d for d in by_range if d.StudyInstanceUID == s.uid["alpha"])
    assert {"CR", "SR", "OT"} & set(alpha.ModalitiesInStudy) >= {"CR", "SR"}
    assert int(alpha.NumberOfStudyRelatedInstances) > 2  # two inputs and the node's results
    listed = findscu(qr, tmp_path, "-S", {"QueryRetrieveLevel": "STUDY",
                                          "StudyInstanceUID": f"{s.uid['ct']}\\{s.uid['beta']}", "StudyDate": "",
                                          "AccessionNumber": "ACC-*"})
    assert sorted((d.StudyInstanceUID, d.AccessionNumber) for d in listed) == sorted(
        [(s.uid["ct"], "ACC-CT"), (s.uid["beta"], "ACC-BETA")])
    assert findscu(qr, tmp_path, "-S", {"QueryRetrieveLevel": "STUDY", "StudyDate": "-20231231",
                                        "StudyInstanceUID": ""})[0].StudyInstanceUID == s.uid["ct"]
    series = findscu(qr, tmp_path, "-S", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": s.uid["alpha"],
                                          "Modality": "", "SeriesInstanceUID": "",
                                          "NumberOfSeriesRelatedInstances": ""})
    assert "CR" in {d.Modality for d in series} and "SR" in {d.Modality for d in series}
    reports = findscu(qr, tmp_path, "-S", {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": s.uid["alpha"], "SOPInstanceUID": "",
        "SOPClassUID": "", "ConceptNameCodeSequence[0].CodeValue": "126000",
        "ConceptNameCodeSequence[0].CodingSchemeDesignator": "DCM", "VerificationFlag": "", "CompletionFlag": "",
        "ContentDate": "", "ContentTemplateSequence[0].TemplateIdentifier": ""})
    assert len(reports) == 1 and reports[0].SOPClassUID in SR_CLASSES
    assert reports[0].VerificationFlag == "UNVERIFIED"
    assert reports[0].ContentTemplateSequence[0].TemplateIdentifier == "1500"
    images = findscu(qr, tmp_path, "-P", {"QueryRetrieveLevel": "IMAGE", "PatientID": s.patient["alpha"],
                                          "StudyInstanceUID": s.uid["alpha"], "Modality": "CR",
                                          "SOPInstanceUID": "", "InstanceNumber": ""})
    assert sorted(d.SOPInstanceUID for d in images) == sorted(s.inputs["alpha"])


def test_getscu_retrieves_inputs_and_results_at_study_series_and_image_level(qr: QRNode, tmp_path: Path) -> None:
    s = qr.studies
    result = dcmtk("getscu", qr, ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={s.uid['alpha']}"],
                   tmp_path / "study")
    assert result.returncode == 0, result.stderr
    got = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "study").iterdir()]
    uids = {str(d.SOPInstanceUID) for d in got}
    assert set(s.inputs["alpha"]) <= uids
    assert {r.SOPInstanceUID for r in results_of(qr.node.port, s.uid["alpha"])} <= uids
    assert {str(d.SOPClassUID) for d in got} & SR_CLASSES
    [report] = results_of(qr.node.port, s.uid["ct"])  # the "not analysed" SR, by IMAGE level
    result = dcmtk("getscu", qr, ["-P", "-k", "QueryRetrieveLevel=IMAGE", "-k", f"PatientID={s.patient['ct']}",
                                  "-k", f"StudyInstanceUID={s.uid['ct']}",
                                  "-k", f"SeriesInstanceUID={report.SeriesInstanceUID}",
                                  "-k", f"SOPInstanceUID={report.SOPInstanceUID}"], tmp_path / "image")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "image").iterdir()] and all(
        pydicom.dcmread(p).SOPInstanceUID == report.SOPInstanceUID for p in (tmp_path / "image").iterdir())
    ct = Dataset()
    ct.QueryRetrieveLevel, ct.StudyInstanceUID, ct.Modality, ct.SeriesInstanceUID = "SERIES", s.uid["ct"], "CT", ""
    [ct_series] = c_find(qr.node.port, ct)
    result = dcmtk("getscu", qr, ["-S", "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={s.uid['ct']}",
                                  "-k", f"SeriesInstanceUID={ct_series.SeriesInstanceUID}"], tmp_path / "series")
    assert result.returncode == 0, result.stderr
    assert sorted(pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "series").iterdir()) == sorted(
        s.inputs["ct"])


def test_movescu_to_a_destination_and_to_an_unknown_ae(qr: QRNode, tmp_path: Path) -> None:
    s = qr.studies
    before = set(qr.archive_dir.iterdir())
    result = dcmtk("movescu", qr, ["-S", "-aem", "ARCHIVE", "-k", "QueryRetrieveLevel=STUDY",
                                   "-k", f"StudyInstanceUID={s.uid['beta']}"], tmp_path / "move")
    assert result.returncode == 0, result.stderr
    moved = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in set(qr.archive_dir.iterdir())
             - before}
    assert set(s.inputs["beta"]) <= moved
    assert {r.SOPInstanceUID for r in results_of(qr.node.port, s.uid["beta"])} <= moved
    moved_ct = archived(qr, lambda: dcmtk("movescu", qr, [
        "-P", "-aem", "ARCHIVE", "-k", "QueryRetrieveLevel=SERIES", "-k", f"PatientID={s.patient['ct']}",
        "-k", f"StudyInstanceUID={s.uid['ct']}", "-k", f"SeriesInstanceUID={series_of(qr, 'ct', 'CT')}"], tmp_path))
    assert moved_ct == set(s.inputs["ct"])
    [report] = results_of(qr.node.port, s.uid["alpha"])
    moved_sr = archived(qr, lambda: dcmtk("movescu", qr, [
        "-S", "-aem", "ARCHIVE", "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={s.uid['alpha']}",
        "-k", f"SeriesInstanceUID={report.SeriesInstanceUID}", "-k", f"SOPInstanceUID={report.SOPInstanceUID}"],
        tmp_path))
    assert moved_sr == {report.SOPInstanceUID}
    unknown = dcmtk("movescu", qr, ["-d", "-S", "-aem", "NOWHERE", "-k", "QueryRetrieveLevel=STUDY",
                                    "-k", f"StudyInstanceUID={s.uid['beta']}"], tmp_path / "unknown")
    assert "0xa801" in (unknown.stdout + unknown.stderr).lower(), unknown.stdout + unknown.stderr


def series_of(qr: QRNode, study: str, modality: str) -> str:
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID, query.Modality = "SERIES", qr.studies.uid[study], modality
    query.SeriesInstanceUID = ""
    [series] = c_find(qr.node.port, query)
    return str(series.SeriesInstanceUID)


def archived(qr: QRNode, move: Callable[[], subprocess.CompletedProcess[str]]) -> set[str]:
    """The SOP Instance UIDs a move added to the archive's folder (storescp names files uniquely)."""
    before = set(qr.archive_dir.iterdir())
    result = move()
    assert result.returncode == 0, result.stderr
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in set(qr.archive_dir.iterdir()) - before}


def test_getscu_at_patient_level_and_with_a_list_of_studies(qr: QRNode, tmp_path: Path) -> None:
    s = qr.studies
    result = dcmtk("getscu", qr, ["-P", "-k", "QueryRetrieveLevel=PATIENT", "-k", f"PatientID={s.patient['beta']}"],
                   tmp_path / "patient")
    assert result.returncode == 0, result.stderr
    got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (tmp_path / "patient").iterdir()}
    assert set(s.inputs["beta"]) | {r.SOPInstanceUID for r in results_of(qr.node.port, s.uid["beta"])} <= got
    assert not got & set(s.inputs["alpha"] + s.inputs["ct"])
    result = dcmtk("getscu", qr, ["-S", "-k", "QueryRetrieveLevel=STUDY",
                                  "-k", f"StudyInstanceUID={s.uid['beta']}\\{s.uid['ct']}"], tmp_path / "list")
    assert result.returncode == 0, result.stderr
    got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (tmp_path / "list").iterdir()}
    assert set(s.inputs["beta"] + s.inputs["ct"]) <= got and not got & set(s.inputs["alpha"])


def test_a_peer_without_the_query_role_is_refused_and_no_patient_value_is_logged(qr: QRNode, tmp_path: Path) -> None:
    result = dcmtk("findscu", qr, ["-d", "-S", "-aet", "STRANGER", "-k", "QueryRetrieveLevel=STUDY",
                                   "-k", "StudyInstanceUID="], tmp_path / "stranger")
    assert "0x0124" in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ""
    assert c_find(qr.node.port, query, calling="STRANGER") == []
    assert len(c_find(qr.node.port, query)) == 3
    log = qr.node.log.read_text()
    assert "C-FIND at STUDY level from FINDSCU" in log
    assert not any(value in log for value in ("PHANTOM^", *qr.studies.patient.values()))


def test_movescu_moves_compressed_inputs_in_their_own_transfer_syntax(qr: QRNode, tmp_path: Path) -> None:
    """An RLE, a JPEG-LS and an uncompressed instance of one SOP class in one study: each reaches
    the archive as it was stored (a destination accepts one transfer syntax per context; one
    context per (class, syntax) lets every file through). Modality OT: no pipeline takes them."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

    from dicom_node.phantoms import render, to_dataset
    from tests.factories import new_uid
    from tests.peers.test_dcmtk import run_storescu

    study, series = new_uid(), new_uid()
    sent: dict[str, str] = {}
    for n, (syntax, options) in enumerate([(RLELossless, ["-R", "-xr"]), (JPEGLSLossless, ["-R", "-xt"]),
                                           (ExplicitVRLittleEndian, [])]):
        ds = to_dataset(render(n + 1, 64), study_uid=study, series_uid=series)
        ds.Modality, ds.PatientID = "OT", "PID-COMPRESSED"
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax)
        path = tmp_path / f"in{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        run_storescu(qr.node.port, options, [path])
        sent[str(ds.SOPInstanceUID)] = str(syntax)
    before = set(qr.archive_dir.iterdir())
    result = dcmtk("movescu", qr, ["-S", "-aem", "ARCHIVE", "-k", "QueryRetrieveLevel=STUDY",
                                   "-k", f"StudyInstanceUID={study}"], tmp_path / "move")
    assert result.returncode == 0, result.stderr
    arrived = {}
    for path in set(qr.archive_dir.iterdir()) - before:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        arrived[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
    assert arrived == sent

"""Real-world headers never make invalid objects: the rules table, and every oddity's outputs
through dciodvfy; the "not analysed" reports (full and minimal) for each as well."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import Dataset, dcmread

from dicom_node.encode import Producer, encode_series, minimal_report, not_analysed
from dicom_node.encode.header import UNSTATED_METHOD, Action, clean_header, multi_frame
from dicom_node.explain.heatmap import Heatmap
from dicom_node.inference.runner import Prediction
from tests.conftest import require_tool
from tests.encode.conftest import dciodvfy_errors
from tests.encode.oddities import ODDITIES, SIZE, radiograph, section

ALL = ("sc", "sr", "seg", "pm", "gsps")

#: oddity -> (keyword, action) the cleaning must report.
EXPECTED = {
    "zero-pixel-spacing": {("PixelSpacing", Action.DROP), ("ImagerPixelSpacing", Action.DROP)},
    "empty-pixel-spacing": {("PixelSpacing", Action.DROP)},
    "empty-slice-thickness": {("SliceThickness", Action.DROP)},
    "zero-slice-thickness": {("SliceThickness", Action.DROP)},
    "no-patient-id": {("PatientID", Action.FIX)},
    "no-study-identifiers": {("StudyID", Action.FIX), ("AccessionNumber", Action.FIX), ("StudyDate", Action.FIX),
                             ("StudyTime", Action.FIX), ("PatientName", Action.FIX)},
    "oblique-patient-orientation": {("PatientOrientation", Action.DROP)},
    "invalid-orientation": {("ImageOrientationPatient", Action.DROP)},
    "de-identified": {("PatientIdentityRemoved", Action.FIX)},
    "un-sop-class": {("SOPClassUID", Action.FIX)},
    "invalid-person-names": {("PatientName", Action.EMPTY), ("ReferringPhysicianName", Action.EMPTY)},
    "invalid-dates-and-sex": {("PatientSex", Action.EMPTY), ("PatientBirthDate", Action.EMPTY),
                              ("StudyTime", Action.EMPTY)},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_oddity_is_fixed_or_dropped_and_named_without_its_value(name: str) -> None:
    source = ODDITIES[name]()
    before = Dataset()
    before.update(source)
    cleaned = clean_header(source)
    assert {(c.keyword, c.action) for c in cleaned.changes} >= EXPECTED[name]
    for change in cleaned.changes:
        record = json.dumps(change.as_record())
        if change.keyword in cleaned.dataset:  # kept or fixed: valid now
            assert clean_header(cleaned.dataset).changes == ()
        assert "PHANTOM" not in record and "1980" not in record and "A^B" not in record
    assert list(source.keys()) == list(before.keys())  # the source itself is left as received


def test_a_valid_header_is_copied_unchanged() -> None:
    for source in (radiograph("CR"), radiograph("DX"), section("CT"), section("MR")):
        assert clean_header(source).changes == ()


def test_de_identified_source_states_an_unknown_method_and_uid_padding_is_removed() -> None:
    cleaned = clean_header(ODDITIES["de-identified"]()).dataset
    assert cleaned.PatientIdentityRemoved == "YES" and cleaned.DeidentificationMethod == UNSTATED_METHOD
    source = ODDITIES["un-sop-class"]()
    cleaned = clean_header(source).dataset
    assert cleaned["SOPClassUID"].VR == "UI" and cleaned.SOPClassUID == radiograph().SOPClassUID


def test_an_empty_method_is_stated_in_the_copy_only() -> None:
    source = ODDITIES["de-identified"]()
    source.DeidentificationMethod = ""
    cleaned = clean_header(source).dataset
    assert cleaned.DeidentificationMethod == UNSTATED_METHOD and source.DeidentificationMethod == ""


def test_frames_are_numbered_only_in_multi_frame_classes() -> None:
    assert multi_frame(ODDITIES["rgb-multi-frame"]())
    assert not multi_frame(ODDITIES["frames-in-single-frame-class"]())
    assert not multi_frame(radiograph())


def analysis(source: Dataset, producer: Producer) -> tuple[list[Prediction], list[Heatmap]]:
    """A prediction and Grad-CAM heatmaps of two labels on every frame of ``source``."""
    manifest = producer.manifest
    uid = str(source.SOPInstanceUID)
    blob = np.zeros((SIZE, SIZE), np.float32)
    blob[20:30, 18:28] = 1.0
    native = cv2.GaussianBlur(blob, (0, 0), 3)
    probabilities = {"nodule": 0.91, "consolidation": 0.12, "effusion": 0.03, "cardiomegaly": 0.55}
    frames = range(int(source.get("NumberOfFrames", 1) or 1))
    predictions = [Prediction(uid, f, manifest.name, manifest.version, manifest.sha256, probabilities,
                              {label.name: label.threshold for label in manifest.labels}) for f in frames]
    heatmaps = [Heatmap(uid, f, label, probabilities[label], "gradcam", manifest.cam_layer, manifest.name,
                        manifest.version, manifest.sha256, native[::2, ::2], native, {"deletion_auc": 0.1})
                for f in frames for label in ("nodule", "cardiomegaly")]
    return predictions, heatmaps


def references_to(ds: Dataset, sop_instance_uid: str) -> list[Dataset]:
    """Every item anywhere in ``ds`` that references ``sop_instance_uid``."""
    found = []
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                if str(item.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid:
                    found.append(item)
                found += references_to(item, sop_instance_uid)
    return found


def _save(tmp_path: Path, objects: list[Dataset]) -> list[Path]:
    paths = []
    for ds in objects:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.mark.peers
@pytest.mark.parametrize("name", sorted(ODDITIES))
def test_every_output_of_every_oddity_passes_dciodvfy(tmp_path: Path, producer: Producer, name: str) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    source = ODDITIES[name]()
    received = [(element.tag, element.VR, str(element.value)) for element in source]
    predictions, heatmaps = analysis(source, producer)
    encoded = encode_series([source], predictions, heatmaps, producer, ALL, ["gradcam"])
    assert [(element.tag, element.VR, str(element.value)) for element in source] == received  # untouched
    assert encoded.failed == ()
    kinds = {ds.SOPClassUID.name for ds in encoded.objects}
    assert {"Secondary Capture Image Storage", "Comprehensive 3D SR Storage"} <= kinds, kinds
    study, series = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
    real_class = str(source.SOPClassUID).rstrip("\x00") if isinstance(source.SOPClassUID, str) \
        else source.SOPClassUID.decode().rstrip("\x00")
    reports = [not_analysed([source], "test reason", producer, study, series),
               minimal_report(study, series, "test reason", producer, [source])]
    referenced = 0
    for path in _save(tmp_path, [*encoded.objects, *reports]):
        errors, output = dciodvfy_errors(dciodvfy, path)
        assert not errors, f"{name}: {dcmread(path).SOPClassUID.name}: {output}"
        written = dcmread(path)
        assert "PatientID" in written and written.StudyInstanceUID == study
        for item in references_to(written, str(source.SOPInstanceUID)):  # its real class, wherever
            assert item.ReferencedSOPClassUID == real_class
            assert "ReferencedFrameNumber" not in item or multi_frame(source)
            referenced += 1
    assert referenced >= len(encoded.objects) + len(reports)  # every object references its source


@pytest.mark.peers
def test_minimal_report_needs_only_the_series_uids(tmp_path: Path, producer: Producer) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    report = minimal_report("1.2.3.4", "1.2.3.4.5", "every encoder failed", producer)
    [path] = _save(tmp_path, [report])
    errors, output = dciodvfy_errors(dciodvfy, path)
    assert not errors, output
    written = dcmread(path)
    assert written.StudyInstanceUID == "1.2.3.4" and written.VerificationFlag == "UNVERIFIED"
    texts = [item.get("TextValue", "") for item in written.ContentSequence]
    assert "Series not analysed: every encoder failed" in texts
    assert any(item.get("UID") == "1.2.3.4.5" for item in written.ContentSequence)


def test_no_report_carries_two_patients(producer: Producer) -> None:
    """Even the fallback refuses sources of two patients: no report names one and shows the other."""
    alpha, beta = radiograph(), radiograph()
    beta.PatientID, beta.PatientName = "OTHER-ID", "Other^Patient"
    with pytest.raises(ValueError, match="several patients"):
        not_analysed([alpha, beta], "reason", producer, str(alpha.StudyInstanceUID), str(alpha.SeriesInstanceUID))

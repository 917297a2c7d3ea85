"""Every object the node creates: valid by dciodvfy, strict pydicom, highdicom's SR reader and
DCMTK's dsr2html; marked AI-generated; deterministic UIDs; findings that match the prediction."""

import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    Comprehensive3DSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from dicom_node import MANUFACTURER
from dicom_node.encode import Producer, encode_results, hot_region, not_analysed_report
from dicom_node.encode.common import DISCLAIMER_TEXT, FAITHFULNESS, VERDICT_CODES
from dicom_node.encode.layout import scale_factor
from tests.conftest import require_tool
from tests.encode.conftest import KINDS, dciodvfy_errors, make_case

SOP_CLASSES = {
    "sc": SecondaryCaptureImageStorage, "sr": Comprehensive3DSRStorage, "seg": SegmentationStorage,
    "pm": ParametricMapStorage, "gsps": GrayscaleSoftcopyPresentationStateStorage,
}
ALL = ("sc", "sr", "seg", "pm", "gsps")


def _write(tmp_path: Path, objects: list[Dataset]) -> list[Path]:
    paths = []
    for ds in objects:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _kinds(objects: list[Dataset]) -> set[str]:
    return {kind for ds in objects for kind, uid in SOP_CLASSES.items() if ds.SOPClassUID == uid}


@pytest.mark.peers
@pytest.mark.parametrize("kind", KINDS)
def test_every_object_passes_dciodvfy_strict_pydicom_and_sr_readers(tmp_path: Path, producer: Producer,
                                                                    kind: str) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    dsr2html = require_tool("dsr2html", "dcmtk")
    case = make_case(kind, producer, methods=("gradcam", "lime"))
    objects = encode_results([case.source], case.predictions, case.heatmaps, producer, ALL, ["gradcam", "lime"])
    expected = set(ALL) - ({"pm"} if kind[:2] in ("CR", "DX") else set())  # no Frame of Reference, no PM
    assert _kinds(objects) == expected
    objects.append(not_analysed_report([case.source], "photometric interpretation 'YBR_FULL' is not supported",
                                       producer))
    for path in _write(tmp_path, objects):
        errors, output = dciodvfy_errors(dciodvfy, path)
        assert not errors, f"{path.name}: {output}"
        with pydicom.config.strict_reading():
            ds = dcmread(path)
            ds.pixel_array if "PixelData" in ds else None  # noqa: B018 - decodes the pixels
        if ds.SOPClassUID == Comprehensive3DSRStorage:
            assert isinstance(hd.sr.srread(path), hd.sr.Comprehensive3DSR)
            html = subprocess.run([dsr2html, str(path)], capture_output=True, timeout=60, check=False)
            assert html.returncode == 0 and b"Imaging Measurement Report" in html.stdout, html.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_are_marked_ai_generated_and_join_the_source_study(producer: Producer, kind: str) -> None:
    case = make_case(kind, producer)
    for ds in encode_results([case.source], case.predictions, case.heatmaps, producer, ALL, ["gradcam"]):
        assert ds.StudyInstanceUID == case.source.StudyInstanceUID
        assert ds.PatientID == case.source.PatientID
        if kind == "CR-odd":  # invalid values are left empty, never copied; orientation never guessed
            assert not ds.get("PatientSex") and not ds.get("PatientBirthDate")
            assert not ds.get("StudyTime") and not ds.get("PatientOrientation")
        assert ds.SeriesInstanceUID != case.source.SeriesInstanceUID
        assert ds.Manufacturer == MANUFACTURER  # never routed back into a model
        assert ds.SeriesDescription.startswith("AI ") and "demo-cxr" in ds.SeriesDescription
        assert producer.manifest.version in ds.ManufacturerModelName
        if ds.SOPClassUID == Comprehensive3DSRStorage:
            assert ds.VerificationFlag == "UNVERIFIED"
            assert ds.ContentSequence  # references checked by the SR tests
        elif ds.SOPClassUID != GrayscaleSoftcopyPresentationStateStorage:
            assert DISCLAIMER_TEXT in ds.DerivationDescription
            assert producer.manifest.sha256[:16] in ds.DerivationDescription
            assert [s.ReferencedSOPInstanceUID for s in ds.SourceImageSequence] == [case.source.SOPInstanceUID]
        else:
            referenced = ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
            assert referenced.ReferencedSOPInstanceUID == case.source.SOPInstanceUID
            texts = [t.UnformattedTextValue for t in ds.GraphicAnnotationSequence[0].TextObjectSequence]
            assert DISCLAIMER_TEXT in texts
        if ds.SOPClassUID == SecondaryCaptureImageStorage:
            assert ds.BurnedInAnnotation == "YES"
            # the source image below the annotation band, scaled up when too small for legible text
            factor = scale_factor(case.source.Rows, case.source.Columns)
            assert ds.Columns == case.source.Columns * factor
            assert ds.Rows > case.source.Rows * factor
            assert f"rows {ds.Rows - case.source.Rows * factor + 1}-{ds.Rows}" in ds.DerivationDescription


def test_uids_derive_from_inputs_model_version_and_method(producer: Producer) -> None:
    case = make_case("CR", producer, methods=("gradcam", "hirescam"))
    first = encode_results([case.source], case.predictions, case.heatmaps, producer, ALL, ["gradcam", "hirescam"])
    again = encode_results([case.source], case.predictions, case.heatmaps, producer, ALL, ["gradcam", "hirescam"])
    assert [ds.SOPInstanceUID for ds in first] == [ds.SOPInstanceUID for ds in again]
    uids = [ds.SOPInstanceUID for ds in first]
    assert len(set(uids)) == len(uids) and all(uid.startswith("2.25.") and len(uid) <= 64 for uid in uids)
    overlays = [ds for ds in first if ds.SOPClassUID == SecondaryCaptureImageStorage]
    assert len({ds.SeriesInstanceUID for ds in overlays}) == 2  # one series per method
    newer = Producer(producer.pipeline, type(producer.manifest)(**{**vars(producer.manifest), "version": "9.9"}),
                     producer.station)
    changed = encode_results([case.source], case.predictions, case.heatmaps, newer, ALL, ["gradcam", "hirescam"])
    assert not {ds.SOPInstanceUID for ds in changed} & set(uids)


def test_sr_findings_match_the_prediction_and_locate_the_hot_region(tmp_path: Path, producer: Producer) -> None:
    case = make_case("DX", producer)
    objects = encode_results([case.source], case.predictions, case.heatmaps, producer, ("sc", "sr"), ["gradcam"])
    [sr_path] = [p for p, ds in zip(_write(tmp_path, objects), objects, strict=True)
                 if ds.SOPClassUID == Comprehensive3DSRStorage]
    report = hd.sr.srread(sr_path)
    # OHIF mishandles groups without a region: only present, explained findings are groups
    assert report.content.get_image_measurement_groups() == []
    groups = report.content.get_planar_roi_measurement_groups()
    prediction = case.predictions[0]
    assert len({g.tracking_uid for g in groups}) == len(groups)
    found = {}
    for group in groups:
        [evaluation] = [e for e in group.get_qualitative_evaluations() if e.name != FAITHFULNESS]
        [probability] = group.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
        label = next(item.name for item in producer.manifest.labels
                     if producer.label_code(item.name) == evaluation.name)
        found[label] = (evaluation.value.meaning, probability.value)
    assert set(found) == {"nodule", "cardiomegaly"}  # present (threshold 0.5) and explained
    for item in document_evaluations(dcmread(sr_path)):  # the others, at document level
        [number] = [i for i in item.ContentSequence if i.ValueType == "NUM"]
        label = next(spec.name for spec in producer.manifest.labels
                     if producer.label_code(spec.name).value == item.ConceptNameCodeSequence[0].CodeValue)
        found[label] = (item.ConceptCodeSequence[0].CodeMeaning,
                        float(number.MeasuredValueSequence[0].NumericValue))
    assert found == {label: ("Present" if p >= 0.5 else "Absent", pytest.approx(p))
                     for label, p in prediction.probabilities.items()}
    [nodule] = [g for g in report.content.get_planar_roi_measurement_groups()
                if g.finding_type.meaning == "Nodule"]
    assert nodule.roi.graphic_type == hd.sr.GraphicTypeValues.ELLIPSE
    centre = nodule.roi.value.mean(axis=0)  # (column, row), pixel centres at +0.5
    assert case.lesion[int(centre[1]), int(centre[0])]
    quality = {m.name.meaning: m.value for m in nodule.get_measurements()}
    assert quality["Deletion AUC"] == pytest.approx(0.12) and quality["Explanation stability"] == pytest.approx(0.93)
    measurements = next(item for item in dcmread(sr_path).ContentSequence
                        if item.ConceptNameCodeSequence[0].CodeValue == "126010")
    illustrations = [item for item in measurements.ContentSequence[0].ContentSequence
                     if item.ConceptNameCodeSequence[0].CodeValue == "121200"]
    overlay_uids = {ds.SOPInstanceUID for ds in objects if ds.SOPClassUID == SecondaryCaptureImageStorage}
    assert illustrations and {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in illustrations} <= overlay_uids


def document_evaluations(report: Dataset) -> list[Dataset]:
    """The items of the report's document-level Qualitative Evaluations container (TID 1500)."""
    containers = [item for item in report.ContentSequence
                  if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    return [item for container in containers for item in container.ContentSequence]


def test_sr_carries_one_coded_verdict_per_explanation(tmp_path: Path, producer: Producer) -> None:
    """DN310 per explanation, its value the Heatmap's verdict, its method as a Derivation modifier."""
    case = make_case("DX", producer, methods=("gradcam", "lime"))
    heatmaps = [replace(h, verdict="faithful") if h.method == "gradcam" else h for h in case.heatmaps]
    objects = encode_results([case.source], case.predictions, heatmaps, producer, ("sr",), ["gradcam", "lime"])
    [sr_path] = _write(tmp_path, objects)

    def verdicts(items: pydicom.Sequence) -> list[tuple[str, str]]:
        found = []
        for item in items:
            if item.ConceptNameCodeSequence[0].CodeValue == FAITHFULNESS.value:
                [modifier] = item.ContentSequence
                found.append((modifier.ConceptCodeSequence[0].CodeMeaning, item.ConceptCodeSequence[0].CodeValue))
            elif "ContentSequence" in item:
                found += verdicts(item.ContentSequence)
        return found

    found = verdicts(dcmread(sr_path).ContentSequence)
    assert len(found) == 2 * 2  # nodule and cardiomegaly are explained, each by two methods
    assert set(found) == {("Gradient-weighted class activation", VERDICT_CODES["faithful"].value),
                          ("Saliency", VERDICT_CODES["not shown to be faithful"].value)}


def test_not_analysed_report_states_the_reason(tmp_path: Path, producer: Producer) -> None:
    case = make_case("CR", producer)
    reason = "model demo-cxr is meant for modalities ['CR', 'DX'], not 'MG'"
    path = _write(tmp_path, [not_analysed_report([case.source], reason, producer)])[0]
    report = hd.sr.srread(path)
    [group] = report.content.get_image_measurement_groups()
    [evaluation] = group.get_qualitative_evaluations()
    assert evaluation.value.meaning == "No algorithms succeeded; without findings"
    comments = [item.TextValue for item in group[0].ContentSequence
                if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert comments == [f"Series not analysed: {reason}"]
    assert report.SeriesDescription.startswith("AI not analysed")


def test_seg_and_gsps_show_present_findings_only(producer: Producer) -> None:
    case = make_case("CT", producer)
    objects = encode_results([case.source], case.predictions, case.heatmaps, producer, ("seg", "gsps"), ["gradcam"])
    [seg] = [ds for ds in objects if ds.SOPClassUID == SegmentationStorage]
    labels = [segment.SegmentLabel for segment in seg.SegmentSequence]
    assert labels == ["nodule (Grad-CAM hot region)", "cardiomegaly (Grad-CAM hot region)"]
    mask = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        [case.source.SOPInstanceUID], combine_segments=False)[0, ..., 0]
    region = hot_region(case.heatmaps[0].native_map)
    assert region is not None and np.array_equal(mask.astype(bool), region.mask)
    assert (mask.astype(bool) & case.lesion).sum() == case.lesion.sum()  # the blurred lesion covers it
    # consolidation (p 0.12) is below its threshold: explained in the SR, but not drawn
    case.heatmaps.append(replace(case.heatmaps[0], label="consolidation", probability=0.12))
    objects = encode_results([case.source], case.predictions, case.heatmaps, producer, ("seg", "gsps"), ["gradcam"])
    [gsps] = [ds for ds in objects if ds.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage]
    texts = [t.UnformattedTextValue for t in gsps.GraphicAnnotationSequence[0].TextObjectSequence]
    assert [t.split(" p=")[0] for t in texts[1:]] == ["nodule", "cardiomegaly"]
    assert len(gsps.GraphicAnnotationSequence[0].GraphicObjectSequence) == 2


def test_encode_rejects_unknown_outputs(producer: Producer) -> None:
    case = make_case("CR", producer)
    with pytest.raises(ValueError, match="unknown \\['png'\\]"):
        encode_results([case.source], case.predictions, case.heatmaps, producer, ("sc", "png"))


def test_hot_region_is_the_connected_part_at_half_maximum() -> None:
    field = np.zeros((40, 60), np.float32)
    field[10:20, 5:15] = 1.0  # the peak's region
    field[30:35, 40:50] = 0.8  # hot too, but not connected to the peak
    field[0, 0] = -5.0  # negative evidence never counts
    region = hot_region(field)
    assert region is not None and region.area == 100
    assert region.mask[10:20, 5:15].all() and not region.mask[30:35, 40:50].any()
    assert region.contour[0].tolist() == region.contour[-1].tolist()  # closed
    centre = region.ellipse.mean(axis=0)
    assert centre == pytest.approx([10.0, 15.0])  # (column, row) of the square's centre, DICOM convention
    assert hot_region(-np.abs(field)) is None  # no positive evidence, no region


@pytest.mark.peers
def test_a_report_without_a_located_finding_has_evaluations_only(tmp_path: Path, producer: Producer) -> None:
    """Nothing explained: no measurement group (OHIF mishandles groups without a region), every
    label a document-level evaluation, and the report still valid and readable."""
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    case = make_case("DX", producer)
    [report] = encode_results([case.source], case.predictions, [], producer, ("sr",), [])
    [path] = _write(tmp_path, [report])
    errors, output = dciodvfy_errors(dciodvfy, path)
    assert not errors, output
    read = hd.sr.srread(path)
    assert read.content.get_planar_roi_measurement_groups() == read.content.get_image_measurement_groups() == []
    assert len(document_evaluations(dcmread(path))) == len(case.predictions[0].probabilities)

"""TID 1500 Measurement Reports in a Comprehensive 3D SR (PS3.16 TID 1500; PS3.3 A.35.13).

One report per analysed series: the node as device observer, the model as Algorithm
Identification, an Image Library of the source images, and per frame and label one measurement
group with a Tracking Unique Identifier (OHIF needs it): the finding's code with present/absent
at the manifest threshold, the probability, and for explained labels the hot region as an
ELLIPSE on the source image (OHIF draws it; radiographs have no Frame of Reference, so regions
are 2D SCOORD), the quality figures of each method and the overlay as "Illustration of ROI".

A series that was routed but could not be analysed gets a report saying so and why
(:func:`not_analysed_report`), so that silence never means "normal".
"""

import hashlib
import math
from collections.abc import Mapping, Sequence

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node import __version__
from dicom_node.encode.common import (
    ABSENT,
    DERIVATION,
    FAITHFULNESS,
    METHOD_CODES,
    METHOD_NAMES,
    PRESENT,
    PROBABILITY,
    QUALITY_CODES,
    SCHEME,
    UNITLESS,
    VERDICT_CODES,
    Producer,
    check_one_series,
)
from dicom_node.encode.region import hot_region
from dicom_node.encode.study import clean_source
from dicom_node.explain.heatmap import Heatmap
from dicom_node.inference.runner import Prediction

IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")
ILLUSTRATION = CodedConcept("121200", "DCM", "Illustration of ROI")
COMMENT = CodedConcept("121106", "DCM", "Comment")
SUMMARY = CodedConcept("111017", "DCM", "CAD Processing and Findings Summary")
NONE_SUCCEEDED = CodedConcept("111245", "DCM", "No algorithms succeeded; without findings")
NOT_ANALYSED = CodedConcept("DN100", SCHEME, "Series not analysed")
Group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
OverlayKey = tuple[str, int, str, str]  # (source SOP Instance UID, frame, label, method)


def algorithm(producer: Producer, methods: Sequence[str]) -> hd.sr.AlgorithmIdentification:
    """The model as TID 4019 Algorithm Identification; parameters name the methods and weights."""
    manifest = producer.manifest
    parameters = [f"weights sha256 {manifest.sha256}", f"pipeline {producer.pipeline}",
                  f"dicom-node {__version__}"]
    parameters += [f"explanation {METHOD_NAMES.get(m, m)}" for m in methods]
    return hd.sr.AlgorithmIdentification(name=manifest.name, version=manifest.version, parameters=parameters)


def _observation_context(producer: Producer) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=producer.device_uid, name=producer.station, manufacturer_name=producer.manufacturer,
        model_name=producer.model_name[:64],
    )
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def _frames(source: Dataset, frame: int) -> list[int] | None:
    return [frame + 1] if int(source.get("NumberOfFrames", 1) or 1) > 1 else None


def _quality(heatmap: Heatmap) -> list[hd.sr.Measurement]:
    method = hd.sr.AlgorithmIdentification(
        name=METHOD_NAMES.get(heatmap.method, heatmap.method), version=__version__,
        parameters=[f"layer {heatmap.layer}"])
    return [
        hd.sr.Measurement(name=QUALITY_CODES[key], value=round(float(value), 6), unit=UNITLESS,
                          method=METHOD_CODES.get(heatmap.method), algorithm_id=method)
        for key, value in heatmap.quality.items() if key in QUALITY_CODES and math.isfinite(value)
    ]


def _verdicts(heatmaps: Sequence[Heatmap]) -> list[hd.sr.QualitativeEvaluation]:
    """One coded verdict per explanation (DN310: DN311 faithful / DN312 not shown to be faithful),
    its method as a Derivation concept modifier so that two methods' verdicts are told apart."""
    evaluations = []
    for heatmap in heatmaps:
        evaluation = hd.sr.QualitativeEvaluation(
            FAITHFULNESS, VERDICT_CODES.get(heatmap.verdict, VERDICT_CODES["not shown to be faithful"]))
        method = METHOD_CODES.get(heatmap.method)
        if method is not None:
            evaluation[0].ContentSequence = [hd.sr.CodeContentItem(
                DERIVATION, method, relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)]
        evaluations.append(evaluation)
    return evaluations


def _group(source: Dataset, prediction: Prediction, label: str, heatmaps: Sequence[Heatmap],
           overlays: Mapping[OverlayKey, Dataset], producer: Producer,
           algorithm_id: hd.sr.AlgorithmIdentification) -> Group:
    sop = str(source.SOPInstanceUID)
    probability = prediction.probabilities[label]
    finding = producer.label_code(label)
    tracking = hd.sr.TrackingIdentifier(
        uid=producer.instance_uid("tracking", source, sop, str(prediction.frame), label),
        identifier=f"{label}, instance {source.get('InstanceNumber', '')} frame {prediction.frame + 1}")
    measurements = [hd.sr.Measurement(
        name=PROBABILITY, value=round(probability, 6), unit=UNITLESS, algorithm_id=algorithm_id,
        referenced_images=[hd.sr.SourceImageForMeasurement(source.SOPClassUID, sop,
                                                           _frames(source, prediction.frame))])]
    for heatmap in heatmaps:
        measurements += _quality(heatmap)
    evaluation = [hd.sr.QualitativeEvaluation(
        finding, PRESENT if probability >= producer.threshold(label) else ABSENT), *_verdicts(heatmaps)]
    present = probability >= producer.threshold(label)
    region = hot_region(heatmaps[0].native_map) if heatmaps and present else None  # no ellipse for Absent
    group: Group
    if region is None:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=finding, algorithm_id=algorithm_id,
            measurements=measurements, qualitative_evaluations=evaluation,
            source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, sop,
                                                                _frames(source, prediction.frame))])
    else:
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=finding, algorithm_id=algorithm_id,
            measurements=measurements, qualitative_evaluations=evaluation,
            referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.ELLIPSE, graphic_data=region.ellipse,
                source_image=hd.sr.SourceImageForRegion(source.SOPClassUID, sop,
                                                        _frames(source, prediction.frame))))
    items = group[0].ContentSequence
    for heatmap in heatmaps:
        overlay = overlays.get((sop, heatmap.frame, label, heatmap.method))
        if overlay is not None:
            items.append(hd.sr.ImageContentItem(ILLUSTRATION, overlay.SOPClassUID, overlay.SOPInstanceUID,
                                                relationship_type="CONTAINS"))
    return group


def measurement_report(
    sources: Sequence[Dataset], predictions: Sequence[Prediction], heatmaps: Sequence[Heatmap],
    producer: Producer, overlays: Mapping[OverlayKey, Dataset] | None = None, methods: Sequence[str] = (),
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of one analysed series.

    Parameters
    ----------
    sources
        The series' instances (headers suffice).
    predictions
        One per analysed frame.
    heatmaps
        The explanations of those frames; the first method's hot region is the group's region.
    overlays
        The Secondary Captures made from ``heatmaps``, referenced as "Illustration of ROI".
    methods
        The pipeline's explanation methods, listed in the algorithm's parameters.
    """
    overlays = overlays or {}
    sources = [clean_source(ds) for ds in sources]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    algorithm_id = algorithm(producer, methods)
    groups = []
    for prediction in predictions:
        source = by_uid[prediction.sop_instance_uid]
        for label in prediction.probabilities:
            explained = [h for h in heatmaps if (h.sop_instance_uid, h.frame, h.label)
                         == (prediction.sop_instance_uid, prediction.frame, label)]
            groups.append(_group(source, prediction, label, explained, overlays, producer, algorithm_id))
    content = hd.sr.MeasurementReport(
        observation_context=_observation_context(producer), procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups, referenced_images=_library(sources))
    return _document(sources, [*sources, *overlays.values()], content, producer, "sr")


def _library(sources: Sequence[Dataset]) -> list[Dataset] | None:
    """The Image Library's entries: highdicom describes a radiograph by its Patient Orientation
    and Imager Pixel Spacing, so one without them is left out (it is still the evidence and each
    group's source image); None when no source qualifies."""
    kept = [ds for ds in sources if "ImageOrientationPatient" in ds
            or (ds.get("PatientOrientation") and "ImagerPixelSpacing" in ds)]
    return kept or None


def not_analysed_report(sources: Sequence[Dataset], reason: str,
                        producer: Producer) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report stating that the series was routed to the model but not analysed, and why."""
    sources = [clean_source(ds) for ds in sources]
    source = sources[0]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=producer.instance_uid("tracking", source, "not-analysed"), identifier="not analysed"),
        algorithm_id=algorithm(producer, []),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(SUMMARY, NONE_SUCCEEDED)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)
                       for ds in sources],
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        COMMENT, f"{NOT_ANALYSED.meaning}: {reason}"[:1024], relationship_type="CONTAINS"))
    content = hd.sr.MeasurementReport(
        observation_context=_observation_context(producer), procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[group], referenced_images=_library(sources))
    return _document(sources, list(sources), content, producer, "not_analysed")


def _document(sources: Sequence[Dataset], evidence: Sequence[Dataset], content: hd.sr.MeasurementReport,
              producer: Producer, kind: str) -> hd.sr.Comprehensive3DSR:
    check_one_series(sources)
    # the report depends on every instance of the series: a changed series is a new report
    analysed = hashlib.sha256("/".join(sorted(str(ds.SOPInstanceUID) for ds in sources)).encode()).hexdigest()
    ds = hd.sr.Comprehensive3DSR(
        evidence=list(evidence), content=content[0],
        series_instance_uid=producer.series_uid(kind, sources[0]),
        series_number=producer.series_number(kind),
        sop_instance_uid=producer.instance_uid(kind, sources[0], "report", analysed[:32]), instance_number=1,
        manufacturer=producer.manufacturer, is_complete=True, is_final=False, is_verified=False,
    )
    what = "not analysed" if kind == "not_analysed" else "findings"
    ds.SeriesDescription = producer.description(what)
    ds.ManufacturerModelName = producer.model_name[:64]
    ds.SoftwareVersions = producer.software_versions
    ds.StationName = producer.station[:16]
    if "SpecificCharacterSet" in sources[0]:
        ds.SpecificCharacterSet = sources[0].SpecificCharacterSet
    ds.CodingSchemeIdentificationSequence = [coding_scheme()]
    return ds


def coding_scheme() -> Dataset:
    """PS3.3 C.12.1.1.5: the private coding scheme of the quality figures, declared."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "dicom-node explanation quality figures"
    item.CodingSchemeResponsibleOrganization = "dicom-node"
    return item

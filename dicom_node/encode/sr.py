"""TID 1500 Measurement Reports in a Comprehensive 3D SR (PS3.16 TID 1500; PS3.3 A.35.13).

One report per analysed series, titled Imaging Measurement Report (the only SR OHIF loads): the
node as device observer, the model as Algorithm Identification, an Image Library of the source
images, and per frame and present, explained finding one TID 1410 measurement group with a
Tracking Unique Identifier (OHIF groups by it): the finding's code as Present, the probability, the
hot region as an ELLIPSE on the source image at group level (OHIF draws it; radiographs have no
Frame of Reference, so regions are 2D SCOORD), the quality figures of each method and the overlay
as "Illustration of ROI". Every other finding (absent, or without a region) is a document-level
qualitative evaluation with its probability: OHIF mishandles groups without a region.

A report made by a later job version of the series lists the earlier reports in its Predecessor
Documents Sequence and says so in its Series Description (:class:`Revision`).

A series that was routed but could not be analysed gets a report saying so and why
(:func:`not_analysed_report`), so that silence never means "normal".
"""

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
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
    mark_equipment,
)
from dicom_node.encode.header import multi_frame
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
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
SOURCE = CodedConcept("260753009", "SCT", "Source")
INPUT_DISTRIBUTION = CodedConcept("DN320", SCHEME, "Input distribution")
OUTSIDE_VALIDATED_INPUT = CodedConcept("DN321", SCHEME, "Outside the validated input")
Group = (hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
         | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations)
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
    return [frame + 1] if multi_frame(source) else None


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
        evaluation = hd.sr.QualitativeEvaluation(FAITHFULNESS, _verdict_value(heatmap))
        evaluation[0].ContentSequence = DicomSequence(_method_modifier(heatmap))
        evaluations.append(evaluation)
    return evaluations


def _verdict_properties(heatmaps: Sequence[Heatmap]) -> list[hd.sr.CodeContentItem]:
    """The same verdicts as properties of a document-level finding (one without a region)."""
    items = []
    for heatmap in heatmaps:
        item = hd.sr.CodeContentItem(FAITHFULNESS, _verdict_value(heatmap),
                                     relationship_type="HAS PROPERTIES")
        item.ContentSequence = DicomSequence(_method_modifier(heatmap))
        items.append(item)
    return items


def _verdict_value(heatmap: Heatmap) -> CodedConcept:
    return VERDICT_CODES.get(heatmap.verdict, VERDICT_CODES["not shown to be faithful"])


def _method_modifier(heatmap: Heatmap) -> list[hd.sr.CodeContentItem]:
    method = METHOD_CODES.get(heatmap.method)
    return [] if method is None else [hd.sr.CodeContentItem(
        DERIVATION, method, relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)]


def _distribution(prediction: Prediction) -> list[hd.sr.QualitativeEvaluation]:
    """The input-distribution gate's warning, on every finding of a frame outside the model's
    validated input that the pipeline reports anyway (``out_of_distribution = "warn"``)."""
    if not prediction.outside_validated_input:
        return []
    return [hd.sr.QualitativeEvaluation(INPUT_DISTRIBUTION, OUTSIDE_VALIDATED_INPUT)]


@dataclass(frozen=True)
class Revision:
    """Which version of a series' report this is (the job's version) and the earlier versions'
    reports it supersedes (PS3.3 C.17.2.3 Predecessor Documents Sequence).

    Parameters
    ----------
    version
        The job version that makes the report.
    predecessors
        The earlier reports as :func:`report_reference` data sets, newest first.
    replaces
        The job version of the newest earlier report; 0 when there is none.
    """

    version: int
    predecessors: tuple[Dataset, ...] = ()
    replaces: int = 0

    def describe(self, what: str) -> str:
        """``what`` with the version, first in the Series Description so that truncation keeps it."""
        if self.version <= 1 and not self.predecessors:
            return what
        return f"{what} v{self.version}" + (f" (replaces v{self.replaces})" if self.predecessors else "")


def report_reference(study_uid: str, series_uid: str, sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """An earlier report as ``previous_versions`` needs it: its study, series and SOP UIDs."""
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop_instance_uid
    return ds


def _region_group(source: Dataset, prediction: Prediction, label: str, heatmaps: Sequence[Heatmap],
                  overlays: Mapping[OverlayKey, Dataset], producer: Producer,
                  algorithm_id: hd.sr.AlgorithmIdentification) -> Group | None:
    """The TID 1410 group of a present, explained finding, with its hot region at group level (what
    OHIF draws); None when the finding has no region (absent, unexplained or without a hot region),
    since OHIF mishandles groups without one: :func:`_evaluation` reports those instead."""
    probability = prediction.probabilities[label]
    present = probability >= producer.threshold(label)
    region = hot_region(heatmaps[0].native_map) if heatmaps and present else None
    if region is None:
        return None
    sop = str(source.SOPInstanceUID)
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
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=finding, algorithm_id=algorithm_id,
        measurements=measurements, qualitative_evaluations=[hd.sr.QualitativeEvaluation(finding, PRESENT),
                                 *_distribution(prediction), *_verdicts(heatmaps)],
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.ELLIPSE, graphic_data=region.ellipse,
            source_image=hd.sr.SourceImageForRegion(source.SOPClassUID, sop,
                                                    _frames(source, prediction.frame))))
    group[0].ContentSequence.extend(_illustrations(sop, label, heatmaps, overlays, "CONTAINS"))
    return group


def _illustrations(sop: str, label: str, heatmaps: Sequence[Heatmap], overlays: Mapping[OverlayKey, Dataset],
                   relationship: str) -> list[hd.sr.ImageContentItem]:
    found = [overlays.get((sop, h.frame, label, h.method)) for h in heatmaps]
    return [hd.sr.ImageContentItem(ILLUSTRATION, ds.SOPClassUID, ds.SOPInstanceUID,
                                   relationship_type=relationship) for ds in found if ds is not None]


def _evaluation(source: Dataset, prediction: Prediction, label: str, heatmaps: Sequence[Heatmap],
                overlays: Mapping[OverlayKey, Dataset], producer: Producer) -> hd.sr.CodeContentItem:
    """A finding without a region as a document-level qualitative evaluation (TID 1500 row 12): the
    finding's code with present/absent, its probability and the source image as properties."""
    sop = str(source.SOPInstanceUID)
    probability = prediction.probabilities[label]
    item = hd.sr.CodeContentItem(
        producer.label_code(label), PRESENT if probability >= producer.threshold(label) else ABSENT,
        relationship_type="CONTAINS")
    item.ContentSequence = DicomSequence([
        hd.sr.NumContentItem(PROBABILITY, round(probability, 6), UNITLESS,
                             relationship_type="HAS PROPERTIES"),
        hd.sr.ImageContentItem(SOURCE, source.SOPClassUID, sop, _frames(source, prediction.frame),
                               relationship_type="HAS PROPERTIES"),
        *_illustrations(sop, label, heatmaps, overlays, "HAS PROPERTIES"),
        *_verdict_properties(heatmaps),
        *([hd.sr.CodeContentItem(INPUT_DISTRIBUTION, OUTSIDE_VALIDATED_INPUT,
                                 relationship_type="HAS PROPERTIES")]
          if prediction.outside_validated_input else [])])
    return item


def _qualitative_evaluations(items: Sequence[hd.sr.CodeContentItem]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    container.ContentSequence = DicomSequence(items)
    return container


def measurement_report(
    sources: Sequence[Dataset], predictions: Sequence[Prediction], heatmaps: Sequence[Heatmap],
    producer: Producer, overlays: Mapping[OverlayKey, Dataset] | None = None, methods: Sequence[str] = (),
    revision: Revision | None = None, more_groups: Sequence[Group] = (),
    more_illustrations: Sequence[Dataset] = (),
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
        Only present findings with a hot region become measurement groups (OHIF draws each one);
        every other finding is a document-level qualitative evaluation.
    overlays
        The Secondary Captures made from ``heatmaps``, referenced as "Illustration of ROI".
    methods
        The pipeline's explanation methods, listed in the algorithm's parameters.
    revision
        The job version this report is and the earlier versions' reports it replaces.
    more_groups
        Measurement groups made elsewhere (a prototype network's, :mod:`.prototypes`), after the
        findings' groups, and ``more_illustrations``, the overlays they reference.
    """
    overlays = overlays or {}
    sources = [clean_source(ds) for ds in sources]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    algorithm_id = algorithm(producer, methods)
    groups: list[Group] = []
    evaluations: list[hd.sr.CodeContentItem] = []
    for prediction in predictions:
        source = by_uid[prediction.sop_instance_uid]
        for label in prediction.probabilities:
            explained = [h for h in heatmaps if (h.sop_instance_uid, h.frame, h.label)
                         == (prediction.sop_instance_uid, prediction.frame, label)]
            group = _region_group(source, prediction, label, explained, overlays, producer, algorithm_id)
            if group is None:
                evaluations.append(_evaluation(source, prediction, label, explained, overlays, producer))
            else:
                groups.append(group)
    content = _content(sources, [*groups, *more_groups], evaluations, producer)
    return _document(sources, [*sources, *overlays.values(), *more_illustrations], content, producer, "sr",
                     revision)


def _content(sources: Sequence[Dataset], groups: Sequence[Group],
             evaluations: Sequence[hd.sr.CodeContentItem], producer: Producer) -> hd.sr.MeasurementReport:
    """TID 1500 with the groups under Imaging Measurements (row 6) and the evaluations under
    Qualitative Evaluations (row 12). With no group (nothing present and explained) row 6 is left
    out, as the template allows; highdicom insists on a group, so a placeholder is built and dropped."""
    placeholder = hd.sr.MeasurementsAndQualitativeEvaluations(tracking_identifier=hd.sr.TrackingIdentifier(
        uid=producer.instance_uid("tracking", sources[0], "placeholder"), identifier="placeholder"))
    content = hd.sr.MeasurementReport(
        observation_context=_observation_context(producer), procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=list(groups) or [placeholder], referenced_images=_library(sources))
    root = content[0]
    if not groups:
        root.ContentSequence = DicomSequence([item for item in root.ContentSequence
                                              if item.ConceptNameCodeSequence[0].CodeValue != "126010"])
    if evaluations:
        root.ContentSequence.append(_qualitative_evaluations(evaluations))
    return content


def _library(sources: Sequence[Dataset]) -> list[Dataset] | None:
    """The Image Library's entries: highdicom describes a radiograph by its Patient Orientation
    and Imager Pixel Spacing, a cross-section by its plane, spacing and Slice Thickness, so one
    without them (dropped by encode.header when unfit) is left out (it is still the evidence and each
    group's source image); None when no source qualifies."""
    kept = [ds for ds in sources if ("ImageOrientationPatient" in ds and "SliceThickness" in ds
                                     and "PixelSpacing" in ds)
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
              producer: Producer, kind: str, revision: Revision | None = None) -> hd.sr.Comprehensive3DSR:
    check_one_series(sources)
    # the report depends on every instance of the series: a changed series is a new report
    analysed = hashlib.sha256("/".join(sorted(str(ds.SOPInstanceUID) for ds in sources)).encode()).hexdigest()
    ds = hd.sr.Comprehensive3DSR(
        evidence=list(evidence), content=content[0],
        series_instance_uid=producer.series_uid(kind, sources[0]),
        series_number=producer.series_number(kind),
        sop_instance_uid=producer.instance_uid(kind, sources[0], "report", analysed[:32]), instance_number=1,
        manufacturer=producer.manufacturer, is_complete=True, is_final=False, is_verified=False,
        previous_versions=list(revision.predecessors) if revision and revision.predecessors else None,
    )
    what = "not analysed" if kind == "not_analysed" else "findings"
    ds.SeriesDescription = producer.description(revision.describe(what) if revision else what)
    mark_equipment(ds, producer)
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

"""The "not analysed" report that always goes out: silence never means "normal".

:func:`not_analysed` builds the full TID 1500 report (:func:`.sr.not_analysed_report`); when that
fails, whatever the cause (a header highdicom refuses, a bug, highdicom itself), it builds
:func:`minimal_report`: a Basic Text SR (PS3.3 A.35.1) written with pydicom alone, that needs
nothing but the series' Study and Series Instance UIDs. It copies the patient and study attributes
and the evidence only where a cleaned header provides them.
"""

import hashlib
import logging
import time
from collections.abc import Sequence

from pydicom import Dataset
from pydicom.uid import BasicTextSRStorage

from dicom_node.encode.common import DISCLAIMER_TEXT, Producer, mark_equipment
from dicom_node.encode.header import TYPE_2, clean_header, restore_classes, stand_in
from dicom_node.encode.sr import not_analysed_report
from dicom_node.store.files import add_file_meta
from dicom_node.store.patient import differing_identity

logger = logging.getLogger(__name__)

#: Concept names of the minimal report (DCM and LOINC codes, as the full report uses).
TITLE = ("18748-4", "LN", "Diagnostic Imaging Report")
COMMENT = ("121106", "DCM", "Comment")
SERIES_UID = ("112002", "DCM", "Series Instance UID")


def not_analysed(sources: Sequence[Dataset], reason: str, producer: Producer, study_instance_uid: str,
                 series_instance_uid: str) -> Dataset:
    """The full "not analysed" report of the series, else the minimal one; never raises for a
    source it cannot read (only for UIDs that are not UIDs), nor for sources of several patients:
    no report, full or minimal, may carry one patient's identity and another's images (ValueError)."""
    differing = differing_identity(sources)
    if differing:
        raise ValueError(f"sources of several patients (they differ in {', '.join(differing)}): no report")
    if sources:
        try:
            cleaned = [clean_header(ds).dataset for ds in sources]
            report = not_analysed_report([stand_in(ds) for ds in cleaned], reason, producer)
            restore_classes(report, {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in cleaned})
            return report
        except Exception as exc:  # whatever failed, a report still goes out
            logger.warning("series %s: the full 'not analysed' report failed (%s); sending the minimal one",
                           series_instance_uid, type(exc).__name__)
    return minimal_report(study_instance_uid, series_instance_uid, reason, producer, sources)


def _code(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _item(value_type: str, name: tuple[str, str, str], **values: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code(name)]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _patient_and_study(ds: Dataset, sources: Sequence[Dataset]) -> None:
    """Type 2 patient and study attributes: from the first source's cleaned header, else empty."""
    for keyword in TYPE_2:
        setattr(ds, keyword, "")
    try:
        header = clean_header(sources[0]).dataset if sources else Dataset()
        for keyword in TYPE_2:
            if header.get(keyword) not in (None, ""):
                setattr(ds, keyword, header[keyword].value)
        if "SpecificCharacterSet" in header:
            ds.SpecificCharacterSet = header.SpecificCharacterSet
    except Exception:  # an unreadable header leaves them empty; the UIDs still file the report
        logger.warning("the minimal report's patient attributes could not be copied; left empty")


def _evidence(study: str, series: str, sources: Sequence[Dataset]) -> list[Dataset]:
    """Current Requested Procedure Evidence: the sources whose SOP class and instance are known."""
    references = []
    for source in sources:
        try:
            header = clean_header(source).dataset
            reference = Dataset()
            reference.ReferencedSOPClassUID = str(header.SOPClassUID)
            reference.ReferencedSOPInstanceUID = str(header.SOPInstanceUID)
            references.append(reference)
        except Exception:  # no class or instance UID: it cannot be referenced
            continue
    if not references:
        return []
    series_item, study_item = Dataset(), Dataset()
    series_item.SeriesInstanceUID, series_item.ReferencedSOPSequence = series, references
    study_item.StudyInstanceUID, study_item.ReferencedSeriesSequence = study, [series_item]
    return [study_item]


def minimal_report(study_instance_uid: str, series_instance_uid: str, reason: str, producer: Producer,
                   sources: Sequence[Dataset] = ()) -> Dataset:
    """A Basic Text SR saying the series was not analysed, and why, in the series' study.

    Built with pydicom only. Its series is the one of the full "not analysed" report; its
    instance UID derives from the series, the model and the analysed instances.
    """
    instances = sorted(str(s.get("SOPInstanceUID", "")) for s in sources)
    analysed = hashlib.sha256("/".join(instances).encode()).hexdigest()[:32]
    ds = Dataset()
    ds.SOPClassUID = BasicTextSRStorage
    series = (study_instance_uid, series_instance_uid)
    ds.SOPInstanceUID = producer.instance_uid("not_analysed", series, "minimal", analysed)
    _patient_and_study(ds, sources)
    ds.StudyInstanceUID = study_instance_uid
    ds.Modality = "SR"
    ds.SeriesInstanceUID = producer.series_uid("not_analysed", series)
    ds.SeriesNumber = producer.series_number("not_analysed")
    ds.SeriesDescription = producer.description("not analysed")
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    mark_equipment(ds, producer)
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = []
    evidence = _evidence(study_instance_uid, series_instance_uid, sources)
    if evidence:
        ds.CurrentRequestedProcedureEvidenceSequence = evidence
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [_code(TITLE)]
    ds.ContentSequence = [
        _item("TEXT", COMMENT, TextValue=f"Series not analysed: {reason}"[:1024]),
        _item("UIDREF", SERIES_UID, UID=series_instance_uid),
        _item("TEXT", COMMENT, TextValue=f"{DISCLAIMER_TEXT}. Model {producer.model_name}, "
                                         f"pipeline {producer.pipeline}."[:1024]),
    ]
    add_file_meta(ds)
    return ds

"""Attributes an output takes from its source: patient, study, geometry."""

import warnings
from typing import Any

import numpy as np
from pydicom import DataElement, Dataset, config
from pydicom.valuerep import DA, TM

#: Patient and General Study module attributes copied as they are, so the output joins the study.
PATIENT_AND_STUDY = {
    "patient_name": "PatientName", "patient_id": "PatientID", "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex", "accession_number": "AccessionNumber", "study_id": "StudyID",
    "study_date": "StudyDate", "study_time": "StudyTime",
    "referring_physician_name": "ReferringPhysicianName",
}


def patient_and_study(source: Dataset) -> dict[str, Any]:
    """highdicom keyword arguments for the source's patient and study (empty values left out);
    ``source`` should come from :func:`clean_source`."""
    values = {argument: source.get(keyword) for argument, keyword in PATIENT_AND_STUDY.items()}
    return {argument: value for argument, value in values.items() if value not in (None, "")}


def clean_source(source: Dataset) -> Dataset:
    """A copy of ``source`` whose patient and study attributes a writer will accept: a Patient's
    Sex other than M, F or O, and dates and times that are not valid DA or TM, are left empty.

    The Storage SCP keeps what peers send as it is; what the node writes must be valid, and an
    error message about such a value would carry patient data into logs and job records.
    """
    clean = Dataset()
    clean.update(source)  # its own element dict; Pixel Data and sequences are shared, not copied
    if hasattr(source, "file_meta"):
        clean.file_meta = source.file_meta
    replace = {}
    if clean.get("PatientSex", "") not in ("", "M", "F", "O"):
        replace["PatientSex"] = ""
    for kind, keywords in ((DA, DATES), (TM, TIMES)):
        replace.update({k: "" for k in keywords if k in clean and not _valid(clean[k].value, kind)})
    for keyword, value in replace.items():
        clean[keyword] = DataElement(clean[keyword].tag, clean[keyword].VR, value)
    return clean


DATES = ("PatientBirthDate", "StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate")
TIMES = ("PatientBirthTime", "StudyTime", "SeriesTime", "ContentTime", "AcquisitionTime")


def _valid(value: Any, kind: type) -> bool:
    if value in (None, ""):
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kind(str(value), validation_mode=config.RAISE)
        return True
    except (ValueError, TypeError):
        return False


def pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    """Pixel Spacing (in the patient), else none. Imager Pixel Spacing is at the detector: copied
    as Pixel Spacing it would make measurements on the overlay wrong by the magnification."""
    value = source.get("PixelSpacing")
    if value is not None and len(value) == 2:
        return float(value[0]), float(value[1])
    shared = source.get("SharedFunctionalGroupsSequence")
    if shared and "PixelMeasuresSequence" in shared[0]:
        value = shared[0].PixelMeasuresSequence[0].get("PixelSpacing")
        if value is not None:
            return float(value[0]), float(value[1])
    return None


def orientation(source: Dataset) -> tuple[str, str] | None:
    """Patient Orientation of the source: its own, else from Image Orientation (Patient), else
    unknown (None): never guessed, a wrong side marker is worse than none."""
    value = source.get("PatientOrientation")
    if value and len(value) == 2 and all(value):
        return str(value[0]), str(value[1])
    cosines = source.get("ImageOrientationPatient")
    if cosines and len(cosines) == 6:
        return _letters(np.array(cosines[:3], float)), _letters(np.array(cosines[3:], float))
    return None


def _letters(direction: np.ndarray) -> str:
    """The patient-axis letters of a direction (PS3.3 C.7.6.1.1.1), strongest first, up to two."""
    names = (("L", "R"), ("P", "A"), ("H", "F"))  # +x is patient left, +y posterior, +z head
    order = np.argsort(-np.abs(direction))
    letters = [names[axis][0 if direction[axis] > 0 else 1] for axis in order if abs(direction[axis]) > 0.25]
    return "".join(letters[:2]) or "L"

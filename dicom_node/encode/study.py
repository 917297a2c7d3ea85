"""Attributes an output takes from its source: patient, study, geometry (from a header that
:mod:`.header` cleaned)."""

from typing import Any

import numpy as np
from pydicom import Dataset

from dicom_node.encode.header import ORIENTATION_LETTERS, clean_header

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
    """A copy of ``source`` whose header every writer accepts (:func:`.header.clean_header`).

    The Storage SCP keeps what peers send as it is; what the node writes must be valid, and an
    error message about such a value would carry patient data into logs and job records.
    """
    return clean_header(source).dataset


def pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    """Pixel Spacing (in the patient), else none. Imager Pixel Spacing is at the detector: copied
    as Pixel Spacing it would make measurements on the overlay wrong by the magnification."""
    value = source.get("PixelSpacing")
    if value is not None and len(value) == 2:
        return float(value[0]), float(value[1])
    shared = source.get("SharedFunctionalGroupsSequence")
    if shared and "PixelMeasuresSequence" in shared[0]:
        value = shared[0].PixelMeasuresSequence[0].get("PixelSpacing")
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return None


def orientation(source: Dataset) -> tuple[str, str] | None:
    """Patient Orientation of the source: its own, else from Image Orientation (Patient), else
    unknown (None): never guessed, a wrong side marker is worse than none."""
    value = source.get("PatientOrientation")
    if value and len(value) == 2 and all(v in ORIENTATION_LETTERS for v in value):
        return str(value[0]), str(value[1])
    cosines = source.get("ImageOrientationPatient")
    if cosines and len(cosines) == 6:
        letters = _letters(np.array(cosines[:3], float)), _letters(np.array(cosines[3:], float))
        # an oblique direction has two letters: not carried over (see encode.header)
        return letters if all(len(v) == 1 for v in letters) else None
    return None


def _letters(direction: np.ndarray) -> str:
    """The patient-axis letters of a direction (PS3.3 C.7.6.1.1.1), strongest first, up to two."""
    names = (("L", "R"), ("P", "A"), ("H", "F"))  # +x is patient left, +y posterior, +z head
    order = np.argsort(-np.abs(direction))
    letters = [names[axis][0 if direction[axis] > 0 else 1] for axis in order if abs(direction[axis]) > 0.25]
    return "".join(letters[:2]) or "L"

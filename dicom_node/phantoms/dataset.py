"""Phantoms as DICOM: CR Image and Digital X-Ray Image (For Presentation) Storage instances.

The modules written are those of the CR Image IOD (PS3.3 A.2) and the DX Image IOD (PS3.3 A.26):
Patient, General Study, General Series, CR Series or DX Series, General Equipment, General Image, Image
Pixel, CR Image or DX Anatomy Imaged / DX Image / DX Detector / DX Positioning, VOI LUT, Acquisition
Context (DX) and SOP Common. UIDs not given are derived from the seed and the encoding, so the same
call always writes the same bytes.
"""

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
)

from dicom_node.phantoms.render import Phantom, render
from dicom_node.store.files import add_file_meta

#: Manufacturer (0008,0070) of every phantom; the node marks its own outputs "dicom-node".
MANUFACTURER = "dicom-node phantoms"
SOP_CLASSES: dict[str, UID] = {
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
}
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
#: VOI window in image units (0..1) from dark lung to spine behind the heart; content independent, so
#: the window carries nothing about the findings.
WINDOW = (0.44, 0.76)  # centre, width
STUDY_DATE, STUDY_TIME = "20240101", "090000"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-node:phantoms")


def phantom_uid(*parts: object) -> UID:
    """A deterministic ``2.25`` UID from ``parts`` (PS3.5 B.2)."""
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(map(str, parts))).int}")


def stored_values(image: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12) -> np.ndarray:
    """Image (0..1, 1 most attenuating) to stored pixel values (uint16).

    MONOCHROME2 stores ``round(image * maxval)``; MONOCHROME1 stores ``maxval`` minus that, so both
    display alike and invert exactly into each other.
    """
    maxval = (1 << bits_stored) - 1
    values = np.rint(np.clip(image, 0.0, 1.0) * np.float64(maxval)).astype(np.uint16)
    return np.uint16(maxval) - values if photometric == "MONOCHROME1" else values


def _check(modality: str, photometric: str, bits_stored: int) -> None:
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality: expected one of {sorted(SOP_CLASSES)}, got {modality!r}")
    if photometric not in PHOTOMETRIC:
        raise ValueError(f"photometric: expected one of {list(PHOTOMETRIC)}, got {photometric!r}")
    if isinstance(bits_stored, bool) or not isinstance(bits_stored, int) or not 12 <= bits_stored <= 16:
        raise ValueError(f"bits_stored: expected an integer from 12 to 16, got {bits_stored!r}")


def _patient_study_series(ds: Dataset, patient: str, modality: str, uids: Mapping[str, str]) -> None:
    ds.PatientName = f"PHANTOM^{patient}"
    ds.PatientID = f"PHANTOM-{patient}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate, ds.StudyTime = STUDY_DATE, STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "PHANTOM"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Phantom chest PA"
    ds.Modality = modality
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"Phantom chest PA {modality}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic chest radiograph"


def _image(ds: Dataset, ph: Phantom, photometric: str, bits_stored: int, instance_number: int) -> None:
    size = ph.image.shape[0]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["L", "F"]
    ds.ContentDate, ds.ContentTime = STUDY_DATE, STUDY_TIME
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    present = [label for label, on in ph.labels.items() if on] or ["none"]
    ds.ImageComments = f"phantom seed={ph.seed} size={size} findings={','.join(present)}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    spacing = [f"{ph.pixel_spacing_mm:.6g}"] * 2
    ds.PixelSpacing = spacing
    ds.ImagerPixelSpacing = spacing
    maxval = (1 << bits_stored) - 1
    centre, width = WINDOW[0] * maxval, WINDOW[1] * maxval
    # The LINEAR VOI of stored values maxval - x mirrors that of x exactly at centre maxval - c + 1.
    ds.WindowCenter = f"{maxval - centre + 1 if photometric == 'MONOCHROME1' else centre:.1f}"
    ds.WindowWidth = f"{width:.1f}"
    ds.WindowCenterWidthExplanation = "LUNG AND MEDIASTINUM"
    ds.PixelData = stored_values(ph.image, photometric, bits_stored).astype("<u2").tobytes()


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def _dx_modules(ds: Dataset, photometric: str) -> None:
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([_code("43799004", "Chest")])
    ds.ViewCodeSequence = Sequence([_code("399348003", "postero-anterior")])
    ds.PositionerType = "COLUMN"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.DetectorType = "SCINTILLATOR"
    ds.AcquisitionContextSequence = Sequence()


def to_dataset(ph: Phantom, *, modality: str = "CR", photometric: str = "MONOCHROME2", bits_stored: int = 12,
               study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None,
               instance_number: int = 1) -> Dataset:
    """A CR or DX (For Presentation) instance of ``ph``, with file meta (Explicit VR Little Endian).

    Parameters
    ----------
    ph
        The rendered phantom.
    modality
        "CR" (CR Image Storage) or "DX" (Digital X-Ray Image Storage - For Presentation).
    photometric
        "MONOCHROME2" stores ``round(image * maxval)``; "MONOCHROME1" stores ``maxval`` minus that.
    bits_stored
        12 to 16; ``maxval = 2**bits_stored - 1``. Bits Allocated is always 16.
    study_uid, series_uid, sop_uid
        Default: derived from the seed (study) and the encoding (series, instance). The patient
        is the seed's (``PHANTOM-<seed>``), or the study's when ``study_uid`` is given: phantoms
        of several seeds put in one study are one patient's, as the node requires of a series.
    instance_number
        Instance Number (0020,0013).

    Returns
    -------
    Dataset
        Ready for ``save_as(path, enforce_file_format=True)``.
    """
    _check(modality, photometric, bits_stored)
    size = ph.image.shape[0]
    encoding = (ph.seed, size, modality, photometric, bits_stored)
    uids = {
        "study": study_uid or phantom_uid("study", ph.seed),
        "series": series_uid or phantom_uid("series", *encoding),
    }
    ds = Dataset()
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.SOPInstanceUID = sop_uid or phantom_uid("instance", uids["series"], *encoding, instance_number)
    ds.InstanceCreationDate, ds.InstanceCreationTime = STUDY_DATE, STUDY_TIME
    patient = str(ph.seed) if study_uid is None else str(phantom_uid("patient", study_uid))[-8:]
    _patient_study_series(ds, patient, modality, uids)
    _image(ds, ph, photometric, bits_stored, instance_number)
    if modality == "DX":
        _dx_modules(ds, photometric)
    add_file_meta(ds)
    return ds


def write_study(folder: Path, count: int, seed: int, *, size: int = 2048,
                findings: Mapping[str, bool] | None = None, **to_dataset_kwargs: Any) -> list[Path]:
    """Write one study of one series: ``count`` phantoms with seeds ``seed`` .. ``seed + count - 1``.

    Parameters
    ----------
    folder
        Created if missing; files are named ``<SOPInstanceUID>.dcm``.
    count
        Number of instances (Instance Number 1 .. count).
    seed
        Seed of the first instance; it also names the study's one patient (``PHANTOM^<seed>``).
    size
        Image size in pixels, passed to :func:`render`.
    findings
        Passed to :func:`render` for every instance (None: drawn per seed).
    **to_dataset_kwargs
        ``modality``, ``photometric``, ``bits_stored``, ``study_uid``, ``series_uid``.

    Returns
    -------
    list[Path]
        The files written, in instance order.
    """
    if count < 1:
        raise ValueError(f"count: expected at least 1, got {count!r}")
    for key in ("sop_uid", "instance_number"):
        if key in to_dataset_kwargs:
            raise ValueError(f"write_study: {key} is set per instance and cannot be given")
    kwargs = dict(to_dataset_kwargs)
    modality, photometric = kwargs.get("modality", "CR"), kwargs.get("photometric", "MONOCHROME2")
    kwargs.setdefault("study_uid", phantom_uid("study", seed, count, size))
    kwargs.setdefault("series_uid", phantom_uid("series", seed, count, size, modality, photometric,
                                                kwargs.get("bits_stored", 12)))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, instance_seed in enumerate(range(seed, seed + count), start=1):
        ds = to_dataset(render(instance_seed, size, findings), instance_number=number, **kwargs)
        ds.PatientName, ds.PatientID = f"PHANTOM^{seed}", f"PHANTOM-{seed}"
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

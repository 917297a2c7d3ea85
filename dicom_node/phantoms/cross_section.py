"""Axial CT and MR phantom slices: a body outline, two lungs or organs, and a round lesion with its
exact mask. They exist for the objects that need a Frame of Reference (Parametric Maps, SEG on
cross-sections); no model of the node is trained on them.

Written as CT Image (PS3.3 A.3) or MR Image (A.4) instances: Patient, General Study, General
Series, Frame of Reference, General Equipment, General Image, Image Plane, Image Pixel, CT Image
or MR Image, VOI LUT, SOP Common.
"""

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from dicom_node.phantoms.dataset import MANUFACTURER, STUDY_DATE, STUDY_TIME, phantom_uid
from dicom_node.store.files import add_file_meta

SPACING_MM = 0.8
THICKNESS_MM = 5.0


@dataclass(frozen=True)
class Slice:
    """One axial slice and the lesion's mask on its grid."""

    dataset: Dataset
    lesion: np.ndarray  # (rows, columns) bool


def _values(modality: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stored values (CT: HU + 1024; MR: arbitrary units) and the lesion mask."""
    y, x = np.mgrid[0:size, 0:size] / size
    body = ((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.32) ** 2 <= 1
    left = ((x - 0.32) / 0.12) ** 2 + ((y - 0.48) / 0.2) ** 2 <= 1
    right = ((x - 0.68) / 0.12) ** 2 + ((y - 0.48) / 0.2) ** 2 <= 1
    cx, cy = rng.uniform(0.27, 0.37), rng.uniform(0.4, 0.56)
    lesion = ((x - cx) ** 2 + (y - cy) ** 2) <= rng.uniform(0.03, 0.05) ** 2
    if modality == "CT":  # air -1000, soft tissue 40, lung -850, lesion 30 HU
        hu = np.full((size, size), -1000.0)
        hu[body], hu[left | right] = 40.0, -850.0
        hu[lesion] = 30.0
        return np.clip(hu + 1024 + rng.normal(0, 12, hu.shape), 0, 4095).astype(np.uint16), lesion
    signal = np.zeros((size, size))
    signal[body], signal[left | right] = 600.0, 80.0
    signal[lesion] = 900.0
    return np.clip(signal + rng.normal(0, 15, signal.shape), 0, 4095).astype(np.uint16), lesion


def cross_section(seed: int, modality: str = "CT", size: int = 256, position: int = 0) -> Slice:
    """An axial ``modality`` ("CT" or "MR") slice of ``size`` pixels at slice ``position``."""
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality: expected 'CT' or 'MR', got {modality!r}")
    rng = np.random.default_rng([seed, position])
    stored, lesion = _values(modality, size, rng)
    study, series = phantom_uid("study", "xs", seed), phantom_uid("series", "xs", seed, modality, size)
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.SOPInstanceUID = phantom_uid("instance", series, position)
    ds.PatientName, ds.PatientID = f"PHANTOM^{seed}", f"PHANTOM-{seed}"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study, STUDY_DATE, STUDY_TIME
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "PHANTOM", ""
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series, 1
    ds.SeriesDescription, ds.BodyPartExamined = f"Phantom chest axial {modality}", "CHEST"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = phantom_uid("frame-of-reference", study)
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, f"synthetic axial {modality}"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if modality == "CT" else ["ORIGINAL", "PRIMARY"]
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = position + 1
    ds.ContentDate, ds.ContentTime = STUDY_DATE, STUDY_TIME
    ds.BurnedInAnnotation = "NO"
    ds.PixelSpacing = [SPACING_MM, SPACING_MM]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    half = size * SPACING_MM / 2
    ds.ImagePositionPatient = [-half, -half, -position * THICKNESS_MM]
    ds.SliceThickness, ds.SliceLocation = THICKNESS_MM, -position * THICKNESS_MM
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP = 120
        ds.WindowCenter, ds.WindowWidth = -600, 1500
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType, ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "2D", 500, 15, 1
        ds.WindowCenter, ds.WindowWidth = 500, 1000
    ds.PixelData = stored.astype("<u2").tobytes()
    add_file_meta(ds)
    return Slice(ds, lesion)

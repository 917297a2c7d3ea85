"""Brain phantoms as DICOM: a single-frame MR Image series, or one Enhanced MR Image instance.

MR Image Storage (PS3.3 A.4): Patient, General Study, General Series, Frame of Reference, General
Equipment, General Image, Image Plane, Image Pixel, MR Image, VOI LUT and SOP Common, one instance
per slice. Enhanced MR Image Storage (PS3.3 A.36.2): the same volume as one multi-frame instance whose
Shared Functional Groups hold pixel measures, plane orientation, frame anatomy, pixel value
transformation, VOI and MR image frame type, and whose Per-frame Functional Groups hold each frame's
content and plane position; Multi-frame Dimension indexes the frames by stack position.

The images are DERIVED (synthetic), so the acquisition modules that apply only to ORIGINAL images
(MR Pulse Sequence, MR Timing and Related Parameters, ...) are left out. Stored values are the
phantom's ``pixels`` with no rescale, so a reader's voxels equal them exactly. UIDs are derived from
the seed and the encoding, so the same call always writes the same bytes.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, EnhancedMRImageStorage, MRImageStorage

from dicom_node.phantoms.brain import BITS_STORED, BrainPhantom
from dicom_node.phantoms.dataset import MANUFACTURER, STUDY_DATE, STUDY_TIME, phantom_uid
from dicom_node.store.files import add_file_meta

BRAIN_CODE = ("12738006", "SCT", "Brain")


@dataclass(frozen=True)
class SeriesUIDs:
    """The study, series and frame of reference of one written phantom."""

    study: UID
    series: UID
    frame_of_reference: UID

    @classmethod
    def of(cls, ph: BrainPhantom, enhanced: bool) -> "SeriesUIDs":
        encoding = (ph.seed, *ph.pixels.shape, *np.round(ph.affine[:3].ravel(), 4), enhanced)
        return cls(study=phantom_uid("brain-study", ph.seed), series=phantom_uid("brain-series", *encoding),
                   frame_of_reference=phantom_uid("brain-frame-of-reference", ph.seed))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _ds(number: float) -> str:
    """A Decimal String of at most 16 characters."""
    text = f"{number:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text[:16]


def _window(ph: BrainPhantom) -> tuple[str, str]:
    low, high = np.percentile(ph.pixels[ph.brain], (1.0, 99.5)) if ph.brain.any() else (0.0, 4095.0)
    return _ds(round((low + high) / 2.0)), _ds(max(round(high - low), 1))


def _comments(ph: BrainPhantom) -> str:
    spacing = "x".join(_ds(s) for s in ph.spacing)
    lesion = (f"lesion={ph.lesion_volume_mm3:.0f}mm3 core={ph.core_volume_mm3:.0f}mm3" if ph.has_lesion
              else "lesion=none")
    return f"phantom seed={ph.seed} spacing={spacing}mm {lesion}"


def _common(ph: BrainPhantom, uids: SeriesUIDs, sop_class: UID, description: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.InstanceCreationDate, ds.InstanceCreationTime = STUDY_DATE, STUDY_TIME
    ds.PatientName = f"PHANTOM^B{ph.seed}"
    ds.PatientID = f"PHANTOM-B{ph.seed}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uids.study
    ds.StudyDate, ds.StudyTime = STUDY_DATE, STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "PHANTOM"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Phantom brain MR"
    ds.Modality = "MR"
    ds.SeriesInstanceUID = uids.series
    ds.SeriesNumber = 1
    ds.SeriesDescription = description
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic brain MR"
    ds.ContentDate, ds.ContentTime = STUDY_DATE, STUDY_TIME
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageComments = _comments(ph)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(ph.pixels.shape[1]), int(ph.pixels.shape[2])
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    return ds


def _geometry(ph: BrainPhantom) -> tuple[list[str], list[str], list[list[str]], np.ndarray]:
    """Pixel Spacing, Image Orientation (Patient), each slice's Image Position (Patient), and normal."""
    steps = np.linalg.norm(ph.affine[:3, :3], axis=0)
    row_dir, col_dir = ph.affine[:3, 2] / steps[2], ph.affine[:3, 1] / steps[1]
    normal = ph.affine[:3, 0] / steps[0]
    positions = [[_ds(v) for v in ph.affine[:3, :3] @ np.array([k, 0.0, 0.0]) + ph.affine[:3, 3]]
                 for k in range(ph.pixels.shape[0])]
    return ([_ds(steps[1]), _ds(steps[2])], [_ds(v) for v in (*row_dir, *col_dir)], positions, normal)


def _mr_acquisition(ds: Dataset, ph: BrainPhantom) -> None:
    ds.ScanningSequence = ["SE", "IR"]
    ds.SequenceVariant = ["SK", "SP"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = "5000"
    ds.EchoTime = "380"
    ds.InversionTime = "1800"
    ds.EchoTrainLength = "1"
    ds.MagneticFieldStrength = "3"
    ds.ImagedNucleus = "1H"
    ds.SliceThickness = _ds(ph.spacing[0])
    ds.SpacingBetweenSlices = _ds(ph.spacing[0])


def mr_series(ph: BrainPhantom) -> list[Dataset]:
    """One MR Image Storage instance per slice (Instance Number 1.. from the first slice), with file meta."""
    uids = SeriesUIDs.of(ph, enhanced=False)
    spacing, orientation, positions, normal = _geometry(ph)
    centre, width = _window(ph)
    out = []
    for k in range(ph.pixels.shape[0]):
        ds = _common(ph, uids, MRImageStorage, "Phantom brain FLAIR-like")
        ds.SOPInstanceUID = phantom_uid("brain-instance", uids.series, k)
        ds.ImageType = ["DERIVED", "PRIMARY", "OTHER"]
        ds.InstanceNumber = k + 1
        _mr_acquisition(ds, ph)
        ds.PixelSpacing = spacing
        ds.ImageOrientationPatient = orientation
        ds.ImagePositionPatient = positions[k]
        ds.SliceLocation = _ds(float(np.array([float(v) for v in positions[k]]) @ normal))
        ds.WindowCenter, ds.WindowWidth = centre, width
        ds.PixelData = np.ascontiguousarray(ph.pixels[k]).astype("<u2").tobytes()
        add_file_meta(ds)
        out.append(ds)
    return out


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _shared_groups(ph: BrainPhantom, spacing: list[str], orientation: list[str]) -> Dataset:
    centre, width = _window(ph)
    anatomy = _item(FrameLaterality="U", AnatomicRegionSequence=Sequence([_code(*BRAIN_CODE)]))
    frame_type = _item(FrameType=["DERIVED", "PRIMARY", "VOLUME", "NONE"], PixelPresentation="MONOCHROME",
                       VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
                       ComplexImageComponent="MAGNITUDE", AcquisitionContrast="FLUID_ATTENUATED")
    return _item(
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=spacing, SliceThickness=_ds(ph.spacing[0]),
                                              SpacingBetweenSlices=_ds(ph.spacing[0]))]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=orientation)]),
        FrameAnatomySequence=Sequence([anatomy]),
        PixelValueTransformationSequence=Sequence([_item(RescaleIntercept="0", RescaleSlope="1",
                                                         RescaleType="US")]),
        FrameVOILUTSequence=Sequence([_item(WindowCenter=centre, WindowWidth=width)]),
        MRImageFrameTypeSequence=Sequence([frame_type]),
    )


def _per_frame_groups(positions: list[list[str]]) -> Sequence:
    items = []
    for k, position in enumerate(positions):
        content = _item(StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[k + 1],
                        FrameAcquisitionDateTime=STUDY_DATE + STUDY_TIME, FrameReferenceDateTime=STUDY_DATE
                        + STUDY_TIME, FrameAcquisitionDuration=0.0)
        items.append(_item(FrameContentSequence=Sequence([content]),
                           PlanePositionSequence=Sequence([_item(ImagePositionPatient=position)])))
    return Sequence(items)


def _dimensions(ds: Dataset, uids: SeriesUIDs) -> None:
    organization = phantom_uid("brain-dimensions", uids.series)
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=organization)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = Sequence([_item(
        DimensionOrganizationUID=organization, DimensionIndexPointer=0x00209057,
        FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="In-Stack Position")])


def enhanced_mr(ph: BrainPhantom) -> Dataset:
    """The volume as one Enhanced MR Image Storage instance (frame k is slice k), with file meta."""
    uids = SeriesUIDs.of(ph, enhanced=True)
    spacing, orientation, positions, _ = _geometry(ph)
    ds = _common(ph, uids, EnhancedMRImageStorage, "Phantom brain FLAIR-like enhanced")
    ds.SOPInstanceUID = phantom_uid("brain-instance", uids.series, "enhanced")
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "1"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "FLUID_ATTENUATED"
    ds.ContentQualification = "RESEARCH"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = Sequence()
    ds.NumberOfFrames = int(ph.pixels.shape[0])
    ds.SharedFunctionalGroupsSequence = Sequence([_shared_groups(ph, spacing, orientation)])
    ds.PerFrameFunctionalGroupsSequence = _per_frame_groups(positions)
    _dimensions(ds, uids)
    ds.PixelData = np.ascontiguousarray(ph.pixels).astype("<u2").tobytes()
    add_file_meta(ds)
    return ds


def write_brain(folder: Path, ph: BrainPhantom, *, enhanced: bool = False) -> list[Path]:
    """Write ``ph`` into ``folder`` (created) as ``<SOPInstanceUID>.dcm``; returns paths in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in [enhanced_mr(ph)] if enhanced else mr_series(ph):
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

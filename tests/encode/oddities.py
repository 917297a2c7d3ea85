"""Sources with the headers real modalities send (64 px): each oddity a small function of a phantom.

Seen in public samples (docs/conformance.md, header cleaning): zero Pixel Spacing, empty Slice
Thickness, no Patient ID, oblique orientations, de-identified without a method, palette colour
ultrasound in a retired class, SOP Class UID encoded as UN. The others are of the same classes.
"""

from collections.abc import Callable
from io import BytesIO

import numpy as np
from pydicom import DataElement, Dataset, dcmread
from pydicom.uid import ExplicitVRBigEndian

from dicom_node.phantoms import render, to_dataset
from dicom_node.phantoms.cross_section import cross_section

SIZE = 64
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
US = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTI_FRAME = "1.2.840.10008.5.1.4.1.1.3.1"
NM_RETIRED = "1.2.840.10008.5.1.4.1.1.5"


def radiograph(modality: str = "CR", size: int = SIZE) -> Dataset:
    return to_dataset(render(11, size, findings={"nodule": True}), modality=modality)


def section(modality: str = "CT") -> Dataset:
    return cross_section(5, modality, size=SIZE).dataset


def _meta(ds: Dataset) -> Dataset:
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def _colour(ds: Dataset, sop_class: str, frames: int = 1, palette: bool = False) -> Dataset:
    """``ds`` as an 8-bit colour ultrasound image of ``sop_class``, RGB or palette colour."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "WindowCenter", "WindowWidth",
                    "WindowCenterWidthExplanation", "PatientOrientation"):
        if keyword in ds:
            del ds[keyword]
    ds.SOPClassUID, ds.Modality = sop_class, "US"
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 255, (frames, SIZE, SIZE), dtype=np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if palette:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "PALETTE COLOR"
        ramp = np.arange(256, dtype=np.uint16) * 257
        for colour, lut in (("Red", ramp), ("Green", ramp[::-1]), ("Blue", ramp // 2)):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
        pixels = gray
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        pixels = np.stack([gray, gray // 2, 255 - gray], axis=-1)
    if frames > 1:
        ds.NumberOfFrames = frames
        if sop_class == US_MULTI_FRAME:
            ds.FrameTime, ds.FrameIncrementPointer = "40", 0x00181063
    ds.PixelData = pixels.tobytes()
    return _meta(ds)


def _big_endian(ds: Dataset) -> Dataset:
    buffer = BytesIO()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(BytesIO(buffer.getvalue()))


def set_attributes(**values: object) -> Callable[[Dataset], Dataset]:
    def apply(ds: Dataset) -> Dataset:
        for keyword, value in values.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        return ds
    return apply


def _un_sop_class(ds: Dataset) -> Dataset:
    ds[0x00080016] = DataElement(0x00080016, "UN", (str(ds.SOPClassUID) + "\x00").encode())
    return ds


OBLIQUE = [0.8, 0.6, 0.0, 0.0, 0.0, -1.0]  # an MR plane between sagittal and coronal
TILTED_3D = [0.7071068, 0.5, 0.5, 0.0, 0.7071068, -0.7071068]  # oblique on every axis

#: name -> source; every oddity the issue lists, and more of the same classes.
ODDITIES: dict[str, Callable[[], Dataset]] = {
    "zero-pixel-spacing": lambda: set_attributes(PixelSpacing=["0", "0"], ImagerPixelSpacing=["0", "0"])(radiograph()),
    "empty-pixel-spacing": lambda: set_attributes(PixelSpacing="", ImagerPixelSpacing=None)(radiograph("DX")),
    "empty-slice-thickness": lambda: set_attributes(SliceThickness="")(section("CT")),
    "zero-slice-thickness": lambda: set_attributes(SliceThickness="0")(section("MR")),
    "no-patient-id": lambda: set_attributes(PatientID=None)(radiograph()),
    "no-study-identifiers": lambda: set_attributes(StudyID=None, AccessionNumber=None, StudyDate=None, StudyTime=None,
                                         PatientName=None)(section("CT")),
    "oblique-patient-orientation": lambda: set_attributes(PatientOrientation=["PL", "F"])(radiograph("DX")),
    "oblique-mr": lambda: set_attributes(ImageOrientationPatient=OBLIQUE)(section("MR")),
    "3d-orientation": lambda: set_attributes(ImageOrientationPatient=TILTED_3D)(section("CT")),
    "invalid-orientation": lambda: set_attributes(ImageOrientationPatient=[1, 0, 0, 1, 0, 0])(section("CT")),
    "de-identified": lambda: set_attributes(PatientIdentityRemoved="YES")(radiograph()),
    "rgb": lambda: _colour(radiograph(), US),
    "rgb-multi-frame": lambda: _colour(radiograph(), US_MULTI_FRAME, frames=2),
    "palette-retired-us": lambda: _colour(radiograph(), US_RETIRED, palette=True),
    "frames-in-single-frame-class": lambda: _colour(radiograph(), US, frames=2),
    "retired-nm": lambda: _meta(set_attributes(SOPClassUID=NM_RETIRED, Modality="NM")(radiograph())),
    "big-endian": lambda: _big_endian(radiograph("DX")),
    "un-sop-class": lambda: _un_sop_class(radiograph()),
    "invalid-person-names": lambda: set_attributes(PatientName="A^B^C^D^E^F", ReferringPhysicianName="a=b=c=d")(
        radiograph()),
    "invalid-dates-and-sex": lambda: set_attributes(PatientSex="m", PatientBirthDate="1980-01-01", StudyTime="9:30")(
        section("CT")),
}

"""Test instances in every transfer syntax the node accepts (``ingest.scp.TRANSFER_SYNTAXES``),
made by pydicom's encoders (RLE, JPEG-LS, JPEG 2000, deflate, big endian) and DCMTK's dcmcjpeg
(the JPEG processes pydicom cannot encode), and a store filled with them."""

import subprocess
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.phantoms.cross_section import cross_section
from dicom_node.phantoms.dataset import phantom_uid
from dicom_node.store import InstanceStore
from tests.conftest import require_tool

STUDY = str(phantom_uid("study", "dicomweb-syntaxes"))
#: dcmcjpeg's option for each JPEG process pydicom has no encoder for.
_DCMCJPEG = {JPEGBaseline8Bit: "+eb", JPEGExtended12Bit: "+ee", JPEGLossless: "+el", JPEGLosslessSV1: "+e1"}


def source(syntax: str, frames: int = 2) -> Dataset:
    """A multi-frame CT phantom (8 bits for JPEG baseline, else 12 of 16), one series per syntax."""
    slices = [cross_section(7, "CT", 64, position).dataset for position in range(frames)]
    ds = slices[0]
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = phantom_uid("series", STUDY, syntax)
    ds.SOPInstanceUID = phantom_uid("instance", STUDY, syntax)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    pixels = np.stack([np.frombuffer(s.PixelData, "<u2").reshape(64, 64) for s in slices])
    if syntax == JPEGBaseline8Bit:
        pixels = (pixels >> 4).astype(np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    return ds


def write(syntax: str, folder: Path, frames: int = 2) -> Path:
    """One instance stored in ``syntax``, written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = source(syntax, frames)
    path = folder / f"{syntax}.dcm"
    if syntax in _DCMCJPEG:
        plain = folder / f"{syntax}.plain.dcm"
        ds.save_as(plain, enforce_file_format=True)
        subprocess.run([require_tool("dcmcjpeg", "dcmtk"), _DCMCJPEG[syntax], plain, path], check=True,
                       capture_output=True)
        return path
    if syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        ds.compress(syntax)
    elif syntax == JPEGLSNearLossless:
        ds.compress(syntax, jls_error=2)
    elif syntax == JPEG2000:
        ds.compress(syntax, j2k_cr=[5])
    elif syntax == ExplicitVRBigEndian:
        ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def data_set(path: Path) -> bytes:
    """The data set of a Part 10 file: what follows its File Meta Information."""
    raw = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return raw[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def ingest(store: InstanceStore, path: Path) -> None:
    """Store a Part 10 file as C-STORE does: its data set as received, its file meta."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    store.commit(store.stage(meta, data_set(path)), "TEST")

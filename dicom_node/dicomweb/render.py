"""Rendered images (PS3.18 10.4 "rendered"): one frame of a stored instance as PNG or JPEG, the
way the dashboard previews an overlay (a colour Secondary Capture as is; grey images through
their modality and VOI LUTs to 8 bits, MONOCHROME1 inverted), scaled down to a width if asked.

:func:`encode` is the one rendering of a frame to an image file: the dashboard's overlay preview
(``dicom_node.web.routes``) calls it too, with :func:`to_display`.
"""

from pathlib import Path

import cv2
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

#: Media types :func:`encode` writes, and the file extension OpenCV encodes each with.
MEDIA_TYPES = {"image/png": ".png", "image/jpeg": ".jpg"}


def to_display(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """8-bit pixels to show: colour as is; grey through the modality LUT and the header's
    first VOI window (or the frame's range without one), inverted for MONOCHROME1."""
    if pixels.ndim == 3:
        return np.clip(pixels, 0, 255).astype(np.uint8) if pixels.dtype != np.uint8 else pixels
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, index=0).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 255.0 - scaled
    return np.round(scaled).astype(np.uint8)


def encode(pixels: np.ndarray, media_type: str, width: int | None = None, quality: int = 90) -> bytes:
    """``pixels`` (8-bit grey, or RGB) as a PNG or JPEG file, scaled to ``width`` if narrower.

    Raises
    ------
    ValueError
        ``media_type`` is not one of :data:`MEDIA_TYPES`, or the encoder failed.
    """
    if media_type not in MEDIA_TYPES:
        raise ValueError(f"media type {media_type!r} is not one of {', '.join(MEDIA_TYPES)}")
    if width is not None and 0 < width < pixels.shape[1]:
        height = max(1, round(pixels.shape[0] * width / pixels.shape[1]))
        pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
    bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR) if pixels.ndim == 3 else pixels
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if media_type == "image/jpeg" else []
    ok, out = cv2.imencode(MEDIA_TYPES[media_type], bgr, params)
    if not ok:
        raise ValueError(f"cannot encode the frame as {media_type}")
    return bytes(out.tobytes())


def render(path: Path, ds: Dataset, index: int, media_type: str, width: int | None = None,
           quality: int = 90, *, whole: bool = False) -> bytes:
    """Frame ``index`` (0-based) of the instance at ``path`` (header ``ds``) as an image file;
    the frame alone is decoded, unless ``whole`` (a deflated file, which pydicom inflates whole)."""
    if whole:
        every = dcmread(path).pixel_array
        pixels = every[index] if int(ds.get("NumberOfFrames") or 1) > 1 else every
    else:
        pixels = pixel_array(str(path), index=index)  # YBR converted to RGB
    return encode(to_display(pixels, ds), media_type, width, quality)

"""DICOM pixels to model input, and the exact map from model pixels back to source pixels.

Per frame: decode (every transfer syntax pydicom's plugins handle); grayscale to display values
through the Modality LUT and the VOI (:mod:`dicom_node.inference.voi`). Colour
(RGB, YBR converted by the decoder, PALETTE COLOR through its LUT) is scaled to [0, 1]. Then a
letterbox resize to the model's square input (aspect ratio kept, centred, black padding) whose
:class:`LetterboxMap` maps any model coordinate to the source grid and back.

Coordinates are continuous: pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``, so the
image's top-left corner is ``(0, 0)`` and its bottom-right corner ``(columns, rows)``.
"""

import time
from dataclasses import dataclass

import cv2
import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_color_lut, pixel_array

from dicom_node.errors import PermanentError
from dicom_node.inference.manifest import InputSpec
from dicom_node.inference.voi import Display, Window, to_display

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class LetterboxMap:
    """Where a source image sits in the model's square input.

    ``model = source * scale + pad`` per axis, in continuous pixel coordinates.
    """

    source_shape: tuple[int, int]  # (rows, columns)
    size: int
    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int

    @classmethod
    def fit(cls, rows: int, columns: int, size: int) -> "LetterboxMap":
        scale = size / max(rows, columns)
        width, height = max(1, round(columns * scale)), max(1, round(rows * scale))
        return cls((rows, columns), size, width / columns, height / rows,
                   (size - width) // 2, (size - height) // 2)

    @property
    def resized_shape(self) -> tuple[int, int]:
        rows, columns = self.source_shape
        return round(rows * self.scale_y), round(columns * self.scale_x)

    def model_to_source(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple:
        return (np.subtract(x, self.pad_x) / self.scale_x, np.subtract(y, self.pad_y) / self.scale_y)

    def source_to_model(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple:
        return (np.multiply(x, self.scale_x) + self.pad_x, np.multiply(y, self.scale_y) + self.pad_y)

    def warp_to_source(self, model_array: np.ndarray) -> np.ndarray:
        """Resample a (size, size) array on the model grid onto the source grid (bilinear)."""
        # cv2 puts pixel centres at integers; ours are at +0.5, hence the shifted offsets.
        matrix = np.array([
            [self.scale_x, 0.0, self.pad_x + 0.5 * self.scale_x - 0.5],
            [0.0, self.scale_y, self.pad_y + 0.5 * self.scale_y - 0.5],
        ])
        rows, columns = self.source_shape
        return cv2.warpAffine(model_array.astype(np.float32), matrix, (columns, rows),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)


@dataclass(frozen=True)
class Preprocessed:
    """One frame, ready for the model."""

    array: np.ndarray  # (channels, size, size) float32, normalised as the manifest says
    map: LetterboxMap
    sop_instance_uid: str
    frame: int
    window: tuple[float, float] | None  # (center, width) applied, if any
    window_source: str  # "file", "voi-lut", "manifest", "percentile" or "colour"


def _frames(ds: Dataset, policy: str) -> list[int]:
    count = int(ds.get("NumberOfFrames", 1) or 1)
    return list(range(count)) if policy == "all" else [count // 2]


def decode_frame(ds: Dataset, frame: int) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise PermanentError("no Pixel Data: not an image")
    try:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return pixel_array(ds, index=frame)
        return ds.pixel_array
    except Exception as exc:  # decoders raise many types for damaged or unsupported data
        raise PermanentError(f"cannot decode pixel data ({ds.file_meta.TransferSyntaxUID.name}): "
                             f"{str(exc).splitlines()[0]}") from None


def _colour(ds: Dataset, raw: np.ndarray) -> np.ndarray:
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb = apply_color_lut(raw, ds)
        return (rgb.astype(np.float32) / (255.0 if rgb.dtype == np.uint8 else 65535.0)).clip(0, 1)
    return (raw.astype(np.float32) / float(2 ** int(ds.BitsStored) - 1)).clip(0, 1)


def to_unit(ds: Dataset, raw: np.ndarray, frame: int, spec: InputSpec) -> Display:
    """A decoded frame as display values in [0, 1]: (rows, columns) or (rows, columns, 3)."""
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric in GRAYSCALE:
        fallback = None
        if spec.window_center is not None and spec.window_width is not None:
            fallback = Window(spec.window_center, spec.window_width)
        return to_display(ds, raw, frame, fallback)
    if photometric in COLOUR:
        return _colour(ds, raw), None, "colour"
    raise PermanentError(f"photometric interpretation {photometric!r} is not supported")


def _channels(unit: np.ndarray, channels: int) -> np.ndarray:
    if unit.ndim == 3 and channels == 1:
        unit = unit @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if unit.ndim == 2:
        unit = unit[:, :, None]
    if unit.shape[2] != channels:
        unit = np.repeat(unit, channels, axis=2)
    return unit


def letterbox(unit: np.ndarray, size: int) -> tuple[np.ndarray, LetterboxMap]:
    """Resize (aspect kept) and centre ``unit`` (rows, columns, channels) in a black square."""
    mapping = LetterboxMap.fit(unit.shape[0], unit.shape[1], size)
    height, width = mapping.resized_shape
    shrinking = height < unit.shape[0] or width < unit.shape[1]
    resized = cv2.resize(unit, (width, height),
                         interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    out = np.zeros((size, size, unit.shape[2]), dtype=np.float32)
    out[mapping.pad_y:mapping.pad_y + height, mapping.pad_x:mapping.pad_x + width] = resized.reshape(
        height, width, unit.shape[2])
    return out, mapping


def normalise(square: np.ndarray, convention: str) -> np.ndarray:
    """(size, size, channels) in [0, 1] -> (channels, size, size) in the model's convention."""
    if convention == "imagenet":
        channels = square.shape[2]
        mean = IMAGENET_MEAN if channels == 3 else IMAGENET_MEAN.mean(keepdims=True)
        std = IMAGENET_STD if channels == 3 else IMAGENET_STD.mean(keepdims=True)
        square = (square - mean) / std
    elif convention == "xrv":
        square = (2.0 * square - 1.0) * 1024.0
    return np.ascontiguousarray(square.transpose(2, 0, 1), dtype=np.float32)


def preprocess(ds: Dataset, spec: InputSpec, timings: dict[str, float] | None = None) -> list[Preprocessed]:
    """Every frame the manifest's multi-frame policy selects, ready for the model; the seconds
    spent decoding are added to ``timings["decode"]`` when given.

    Raises
    ------
    PermanentError
        If the instance has no pixels, cannot be decoded, or has an unsupported photometric
        interpretation; the reason names which.
    """
    out = []
    for frame in _frames(ds, spec.multiframe):
        started = time.perf_counter()
        raw = decode_frame(ds, frame)
        if timings is not None:
            timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - started
        unit, window, source = to_unit(ds, raw, frame, spec)
        square, mapping = letterbox(_channels(unit, spec.channels), spec.size)
        out.append(Preprocessed(normalise(square, spec.normalization), mapping,
                                str(ds.SOPInstanceUID), frame, window, source))
    return out

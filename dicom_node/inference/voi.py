"""Grayscale pixel values to display values in [0, 1]: Modality LUT, then VOI (PS3.3 C.11).

Rescale and window come from the frame's Per-frame Functional Groups, else the Shared Functional
Groups (enhanced multi-frame objects), else the top level. The VOI is the file's first usable
window, else its VOI LUT, else the manifest's window, else a robust percentile window;
MONOCHROME1 is inverted after it, as a viewer does. A rescale that is not a number, a VOI LUT
that cannot be applied, or pixel values that are not finite fail permanently with the reason.
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from dicom_node.errors import PermanentError

logger = logging.getLogger(__name__)

PERCENTILES = (0.5, 99.5)
FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass(frozen=True)
class Window:
    """A VOI window: centre and width in Modality LUT output units, and its function."""

    center: float
    width: float
    function: str = "LINEAR"

    def __post_init__(self) -> None:
        wide_enough = self.width >= 1 if self.function == "LINEAR" else self.width > 0
        if not (math.isfinite(self.center) and math.isfinite(self.width) and wide_enough
                and self.function in FUNCTIONS):
            raise ValueError(f"window {self.center}/{self.width} ({self.function}) is not valid")


def frame_attribute(ds: Dataset, frame: int, group: str, keyword: str) -> Any:
    """``keyword`` from the frame's functional group, the shared one, or the top level."""
    containers = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        containers.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        containers.append(shared[0])
    for container in containers:
        items = container.get(group)
        if items and keyword in items[0]:
            return items[0][keyword].value
    return ds.get(keyword)


def _first(value: Any) -> float:
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0]
    return float(value)


def modality_lut(ds: Dataset, raw: np.ndarray, frame: int) -> np.ndarray:
    """Modality LUT output as float32 (Rescale Slope/Intercept without a float64 copy)."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(raw, ds).astype(np.float32)
    group = "PixelValueTransformationSequence"
    slope = intercept = None
    try:
        slope = frame_attribute(ds, frame, group, "RescaleSlope")
        intercept = frame_attribute(ds, frame, group, "RescaleIntercept")
        slope = 1.0 if slope in (None, "") else _first(slope)
        intercept = 0.0 if intercept in (None, "") else _first(intercept)
    except (TypeError, ValueError, IndexError):
        raise PermanentError(f"Rescale Slope/Intercept {slope!r}/{intercept!r} are not numbers") from None
    values = raw.astype(np.float32)
    if slope != 1:
        values *= slope
    if intercept:
        values += intercept
    if not np.isfinite(values).all():
        raise PermanentError("pixel data holds values that are not finite (NaN or infinity)")
    return values


def file_window(ds: Dataset, frame: int) -> Window | None:
    """The frame's first VOI window; None if it has none or an unusable one (logged): the next
    VOI source is used then."""
    group = "FrameVOILUTSequence"
    center = width = function = None
    try:
        center = frame_attribute(ds, frame, group, "WindowCenter")
        width = frame_attribute(ds, frame, group, "WindowWidth")
        if center in (None, "") or width in (None, ""):
            return None
        function = frame_attribute(ds, frame, group, "VOILUTFunction") or "LINEAR"
        return Window(_first(center), _first(width), str(function).upper())
    except (TypeError, ValueError, IndexError):
        logger.warning("%s: ignoring window centre/width %r/%r (%s): not valid",
                       ds.get("SOPInstanceUID", "?"), center, width, function)
        return None


def window_linear(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR", inplace: bool = False
) -> np.ndarray:
    """PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT or SIGMOID VOI to [0, 1] (float32).

    ``inplace`` reuses ``values`` (float32) for the result: a 2000x2000 image then needs no copy.
    """
    out = values if inplace and values.dtype == np.float32 else values.astype(np.float32)
    if function == "SIGMOID":
        out -= center
        out *= -4.0 / width
        np.exp(out, out=out)
        out += 1.0
        return np.reciprocal(out, out=out)
    if function == "LINEAR" and width <= 1:  # a threshold: the standard's formula divides by 0
        return np.greater(out, center - 0.5, out=np.empty_like(out)).astype(np.float32, copy=False)
    if function == "LINEAR_EXACT":
        out -= center
        out /= width
    else:
        out -= center - 0.5
        out /= width - 1
    out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def _voi_lut(ds: Dataset, values: np.ndarray) -> np.ndarray:
    """The first VOI LUT of the file, applied to Modality LUT output, scaled to [0, 1]."""
    try:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        indices = np.rint(values).astype(np.int64)
        out = apply_voi_lut(indices, ds, prefer_lut=True).astype(np.float32)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise PermanentError(f"VOI LUT Sequence is not usable: {exc}") from None
    return (out / (2**bits - 1)).clip(0.0, 1.0)


Display = tuple[np.ndarray, tuple[float, float] | None, str]  # values in [0, 1], window, its source


def to_display(ds: Dataset, raw: np.ndarray, frame: int, fallback: Window | None) -> Display:
    """A decoded grayscale frame as display values in [0, 1] (MONOCHROME1 inverted)."""
    values = modality_lut(ds, raw, frame)
    window = file_window(ds, frame)
    if window is not None:
        source = "file"
    elif "VOILUTSequence" in ds:
        unit = _voi_lut(ds, values)
        window, source = None, "voi-lut"
    elif fallback is not None:
        window, source = fallback, "manifest"
    else:
        step = max(1, int(np.sqrt(values.size / 250_000)))  # percentiles of a ~250k-pixel grid
        low, high = (float(v) for v in np.percentile(values[::step, ::step], PERCENTILES))
        window, source = Window((low + high) / 2, max(high - low, 1.0) + 1), "percentile"
    if window is not None:
        unit = window_linear(values, window.center, window.width, window.function, inplace=True)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        np.subtract(1.0, unit, out=unit)
    reported = (window.center, window.width) if window is not None else None
    return unit, reported, source

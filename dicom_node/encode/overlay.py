"""Secondary Capture overlays: the source as a viewer shows it, the heatmap, its hot region, a
legend and a banner that cannot be missed (PS3.3 A.8.1, Secondary Capture Image).

The image keeps the source's rows, columns and pixel spacing, so a point on the overlay is the
same point on the source. Burned In Annotation is YES: the banner is part of the pixels.
"""

import cv2
import numpy as np
from highdicom.sc import SCImage
from pydicom import Dataset

from dicom_node.encode.common import (
    DISCLAIMER,
    DISCLAIMER_TEXT,
    METHOD_NAMES,
    Producer,
    mark_derived,
    source_reference,
)
from dicom_node.encode.region import hot_region
from dicom_node.encode.study import clean_source, orientation, patient_and_study, pixel_spacing
from dicom_node.explain.heatmap import Heatmap
from dicom_node.inference.manifest import InputSpec
from dicom_node.inference.preprocess import decode_frame, to_unit

COLOUR_MAP = cv2.COLORMAP_INFERNO  # perceptually uniform, readable in grayscale print-outs
BLEND = 0.55  # opacity of the heatmap where it is at its maximum
CONTOUR = (0, 255, 255)  # RGB cyan: stands out on inferno's black-red-yellow


def source_display(source: Dataset, frame: int) -> np.ndarray:
    """The frame as a viewer shows it: RGB uint8, the file's VOI applied, MONOCHROME1 inverted."""
    unit, _, _ = to_unit(source, decode_frame(source, frame), frame, InputSpec(size=1))
    gray = np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return gray if gray.ndim == 3 else np.repeat(gray[..., None], 3, axis=2)


def render_overlay(display: np.ndarray, heatmap: Heatmap) -> np.ndarray:
    """``display`` (rows, columns, 3) with the heatmap, hot-region contour, legend and banner."""
    rows, columns = display.shape[:2]
    values = np.nan_to_num(heatmap.native_map.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0, copy=False)
    top = float(values.max())
    image = display.copy()
    if top > 0:
        shown = values > top / 255  # where the map adds colour; elsewhere the source stays as it is
        relative = values[shown] / top
        colours = _colour_map(np.round(relative * 255).astype(np.uint8)[:, None])[:, 0].astype(np.float32)
        alpha = (BLEND * relative)[:, None]
        image[shown] = np.round(display[shown] * (1 - alpha) + colours * alpha).astype(np.uint8)
    unit = max(1, round(min(rows, columns) / 500))  # line width and text scale follow the image size
    region = hot_region(heatmap.native_map)
    if region is not None:
        cv2.polylines(image, [np.round(region.contour - 0.5).astype(np.int32)], True, CONTOUR, 2 * unit,
                      cv2.LINE_AA)
    _legend(image, unit, METHOD_NAMES.get(heatmap.method, heatmap.method))
    _banner(image, unit, [
        DISCLAIMER,
        f"{heatmap.model} {heatmap.model_version} · {METHOD_NAMES.get(heatmap.method, heatmap.method)} · "
        f"{heatmap.label} p={heatmap.probability:.2f}",
        heatmap.banner_line,
    ])
    return image


def _colour_map(values: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.applyColorMap(values, COLOUR_MAP), cv2.COLOR_BGR2RGB)


def _text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float, colour: tuple[int, int, int],
          thickness: int) -> None:
    """``text`` with " · " drawn as a dot (Hershey fonts are ASCII only)."""
    x, y = origin
    parts = text.split(" · ")
    for i, part in enumerate(parts):
        cv2.putText(image, part, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
        x += cv2.getTextSize(part, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0]
        if i < len(parts) - 1:
            gap = cv2.getTextSize("  ", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0]
            height = cv2.getTextSize("x", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][1]
            cv2.circle(image, (x + gap // 2, y - height // 2), max(1, thickness), colour, -1, cv2.LINE_AA)
            x += gap


def _fit_scale(lines: list[str], width: int, unit: int) -> float:
    """The largest text scale (up to 0.5 per unit) at which every line fits ``width``."""
    scale = 0.5 * unit
    widest = max(cv2.getTextSize(line.replace(" · ", "   "), cv2.FONT_HERSHEY_SIMPLEX, scale, unit)[0][0]
                 for line in lines)
    return scale * min(1.0, width / max(widest, 1))


def _banner(image: np.ndarray, unit: int, lines: list[str]) -> None:
    columns = image.shape[1]
    scale = _fit_scale(lines, columns - 16 * unit, unit)
    line_height = round(cv2.getTextSize("Xg", cv2.FONT_HERSHEY_SIMPLEX, scale, unit)[0][1] * 1.7)
    height = line_height * len(lines) + 6 * unit
    band = image[:height]
    band[:] = (band * 0.15).astype(np.uint8)  # darkened, not blank: the film's edge stays visible
    for i, line in enumerate(lines):
        colour = (255, 220, 0) if i == 0 else (255, 255, 255)
        _text(image, line, (8 * unit, line_height * (i + 1)), scale, colour, unit)


def _legend(image: np.ndarray, unit: int, method: str) -> None:
    """A vertical colour scale at the right edge: the map relative to its own maximum."""
    rows, columns = image.shape[:2]
    height, width = rows // 3, max(8, columns // 60)
    x0, y0 = columns - width - 40 * unit, rows - height - 20 * unit
    ramp = np.linspace(255, 0, height).astype(np.uint8)[:, None].repeat(width, axis=1)
    image[y0:y0 + height, x0:x0 + width] = _colour_map(ramp)
    cv2.rectangle(image, (x0, y0), (x0 + width, y0 + height), (255, 255, 255), unit)
    scale = 0.4 * unit
    for text, y in (("max", y0 + 10 * unit), ("0", y0 + height)):
        cv2.putText(image, text, (x0 + width + 4 * unit, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    unit, cv2.LINE_AA)
    label = f"{method}, relative"
    size = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, unit)[0]
    cv2.putText(image, label, (min(x0, columns - size[0] - 2), y0 - 6 * unit), cv2.FONT_HERSHEY_SIMPLEX,
                scale, (255, 255, 255), unit, cv2.LINE_AA)


def secondary_capture(source: Dataset, heatmap: Heatmap, producer: Producer, instance_number: int,
                      display: np.ndarray | None = None) -> Dataset:
    """The overlay of ``heatmap`` on ``source`` as a Secondary Capture Image in the source's study.

    One series per (source series, pipeline, method); the instance UID follows from the source
    instance, frame, label and method, so a re-run replaces it. ``display``: the frame's
    :func:`source_display`, when the caller has it already.
    """
    if display is None:
        display = source_display(source, heatmap.frame)
    source = clean_source(source)
    pixels = render_overlay(display, heatmap)
    method_name = METHOD_NAMES.get(heatmap.method, heatmap.method)
    ds = SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=producer.series_uid("sc", source, heatmap.method),
        series_number=producer.series_number("sc", heatmap.method),
        sop_instance_uid=producer.instance_uid("sc", source, heatmap.method, source.SOPInstanceUID,
                                               str(heatmap.frame), heatmap.label),
        instance_number=instance_number, manufacturer=producer.manufacturer,
        # highdicom insists on an orientation for the PATIENT coordinate system; the real one (or
        # none) is set right after
        pixel_spacing=pixel_spacing(source), patient_orientation=orientation(source) or ("L", "F"),
        laterality=source.get("Laterality") or None,
        **patient_and_study(source),
    )
    ds.PatientOrientation = list(orientation(source) or [])  # unknown stays empty (Type 2C), not guessed
    ds.SeriesDescription = producer.description("overlay", heatmap.method)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "YES"
    ds.ConversionType = "WSD"  # made by a workstation, not digitised
    ds.RecognizableVisualFeatures = source.get("RecognizableVisualFeatures", "NO")
    ds.ImageComments = f"{DISCLAIMER_TEXT}. {method_name} of {heatmap.label}, p={heatmap.probability:.3f}"
    reference = source_reference(source)
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        reference.ReferencedFrameNumber = heatmap.frame + 1
    ds.SourceImageSequence = [reference]
    mark_derived(ds, [source], producer, f"{method_name} heatmap of '{heatmap.label}' "
                 f"(layer {heatmap.layer}) blended over the source image")
    return ds

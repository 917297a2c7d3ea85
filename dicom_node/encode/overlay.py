"""Secondary Capture overlays: the source as a viewer shows it, the heatmap, its hot region, and
in a band above the image a banner that cannot be missed and a colour scale (PS3.3 A.8.1,
Secondary Capture Image).

Nothing is drawn over the source image but the heatmap blend and the hot region's outline: the
banner ("AI-GENERATED · UNVERIFIED · NOT FOR DIAGNOSTIC USE", model, version, method, label,
probability) and the colour scale sit in an annotation band added above the image
(:mod:`dicom_node.encode.layout`), so the whole image stays visible at native resolution. An
image too small to carry legible text is scaled up by an integer factor (nearest neighbour) and
the SC says so. Pixel Spacing, when carried, describes the image part (divided by the factor).
Burned In Annotation is YES: the banner is part of the pixels.
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
from dicom_node.encode.header import multi_frame
from dicom_node.encode.layout import Layout, Line, draw_band, plan, scale_factor
from dicom_node.encode.region import hot_region
from dicom_node.encode.study import clean_source, orientation, patient_and_study, pixel_spacing
from dicom_node.explain.heatmap import Heatmap
from dicom_node.inference.manifest import InputSpec
from dicom_node.inference.preprocess import decode_frame, to_unit

COLOUR_MAP = cv2.COLORMAP_INFERNO  # perceptually uniform, readable in grayscale print-outs
BLEND = 0.55  # opacity of the heatmap where it is at its maximum
CONTOUR = (0, 255, 255)  # RGB cyan: stands out on inferno's black-red-yellow
DISCLAIMER_COLOUR = (255, 220, 0)
TEXT_COLOUR = (255, 255, 255)


def source_display(source: Dataset, frame: int) -> np.ndarray:
    """The frame as a viewer shows it: RGB uint8, the file's VOI applied, MONOCHROME1 inverted."""
    unit, _, _ = to_unit(source, decode_frame(source, frame), frame, InputSpec(size=1))
    gray = np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return gray if gray.ndim == 3 else np.repeat(gray[..., None], 3, axis=2)


def blend_heatmap(display: np.ndarray, heatmap: Heatmap) -> np.ndarray:
    """``display`` (rows, columns, 3) with the positive part of the map blended in, nothing else:
    where the map adds no colour the pixels are the display's own. The colour scale runs from 0 to
    the heatmap's ``scale_max`` when it has one (attention coefficients: 1, so that slices compare),
    else to the map's maximum."""
    values = _finite(heatmap.native_map)
    top = float(values.max()) if heatmap.scale_max is None else heatmap.scale_max
    image = display.copy()
    if top <= 0:
        return image
    shown = values > top / 255
    if not shown.any():
        return image
    rows, columns = np.flatnonzero(shown.any(axis=1)), np.flatnonzero(shown.any(axis=0))
    box = slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)  # where the map adds colour
    relative = np.where(shown[box], np.minimum(values[box] / top, 1), np.float32(0))  # alpha 0: kept as is
    colours = _colour_map(np.round(relative * 255).astype(np.uint8)).astype(np.float32)
    alpha = (BLEND * relative)[..., None]
    image[box] = np.round(display[box] * (1 - alpha) + colours * alpha).astype(np.uint8)
    return image


def overlay_layout(display: np.ndarray, heatmap: Heatmap) -> Layout:
    """Where :func:`render_overlay` puts the image and the band for this display and heatmap."""
    rows, columns = display.shape[:2]
    return plan(rows, columns, _lines(heatmap, scale_factor(rows, columns)), _scale_label(heatmap))


def render_overlay(display: np.ndarray, heatmap: Heatmap) -> np.ndarray:
    """The overlay's pixels: the annotation band on top, then ``display`` (rows, columns, 3), scaled
    by the layout's factor, with the heatmap blended in and the hot region outlined.

    The image part (see :func:`overlay_layout`) is :func:`blend_heatmap`'s result scaled up, plus
    the outline; the band holds the banner and the colour scale and covers none of the image.
    """
    layout = overlay_layout(display, heatmap)
    factor = layout.factor
    image = blend_heatmap(display, heatmap)
    if factor > 1:
        image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    region = hot_region(heatmap.native_map)
    if region is not None:
        width = max(1, round(min(image.shape[:2]) / 500))  # the outline follows the image size
        segments = _inner_segments(region.contour, display.shape[0], display.shape[1])
        points = [np.round(segment * factor - 0.5).astype(np.int32) for segment in segments]
        cv2.polylines(image, points, False, CONTOUR, 2 * width, cv2.LINE_AA)
    canvas = np.zeros((layout.rows, layout.columns, 3), np.uint8)
    canvas[layout.image_slices] = image
    draw_band(canvas, layout, _colour_map(np.arange(256, dtype=np.uint8)[:, None])[:, 0])
    return canvas


def _inner_segments(contour: np.ndarray, rows: int, columns: int) -> list[np.ndarray]:
    """The closed ``contour`` as runs of points, less its segments along the image's edge: a
    region the edge cuts off has no outline there, which would only hide its own edge pixels."""
    low, high = 0.5, np.array([columns - 0.5, rows - 0.5])  # pixel centres of the edge pixels
    starts, ends = contour[:-1], contour[1:]
    along = np.any(((starts == low) & (ends == low)) | ((starts == high) & (ends == high)), axis=1)
    if not along.any():
        return [contour]
    runs: list[np.ndarray] = []
    current: list[np.ndarray] = []
    first = int(np.flatnonzero(along)[0])
    for i in np.roll(np.arange(len(starts)), -(first + 1)):  # from just after an edge segment
        if along[i]:
            runs += [np.array(current)] if current else []
            current = []
        else:
            current += [ends[i]] if current else [starts[i], ends[i]]
    return runs + ([np.array(current)] if current else [])


def _finite(native_map: np.ndarray) -> np.ndarray:
    return np.nan_to_num(native_map.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0, copy=False)


def _lines(heatmap: Heatmap, factor: int) -> list[Line]:
    """The banner: the disclaimer, then what made the map (and the scaling, when there is one)."""
    method = METHOD_NAMES.get(heatmap.method, heatmap.method)
    about = (f"{heatmap.model} {heatmap.model_version} · {method} · {heatmap.label} "
             f"p={heatmap.probability:.2f}")
    scaled = f" · image scaled up x{factor}" if factor > 1 else ""
    notes = [Line(note, DISCLAIMER_COLOUR) for note in heatmap.notes]  # e.g. outside the validated input
    return [Line(DISCLAIMER, DISCLAIMER_COLOUR), Line(about + scaled, TEXT_COLOUR),
            Line(heatmap.banner_line, TEXT_COLOUR), *notes]


def _scale_label(heatmap: Heatmap) -> str:
    name = METHOD_NAMES.get(heatmap.method, heatmap.method)
    if heatmap.scale_max is None:
        return f"{name}, relative to its maximum:"
    return f"{name}, 0 to {heatmap.scale_max:g}:"


def _colour_map(values: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.applyColorMap(values, COLOUR_MAP), cv2.COLOR_BGR2RGB)


def secondary_capture(source: Dataset, heatmap: Heatmap, producer: Producer, instance_number: int,
                      display: np.ndarray | None = None) -> Dataset:
    """The overlay of ``heatmap`` on ``source`` as a Secondary Capture Image in the source's study.

    One series per (source series, pipeline, method); the instance UID follows from the source
    instance, frame, label and method, so a re-run replaces it. ``display``: the frame's
    :func:`source_display`, when the caller has it already. The SC is the annotation band above
    the image part (:func:`overlay_layout`); Derivation Description says where each is.
    """
    if display is None:
        display = source_display(source, heatmap.frame)
    source = clean_source(source)
    layout = overlay_layout(display, heatmap)
    method_name = METHOD_NAMES.get(heatmap.method, heatmap.method)
    ds = capture(source, render_overlay(display, heatmap), producer, heatmap.method, heatmap.frame,
                 (heatmap.label,), instance_number, layout.factor)
    ds.SeriesDescription = producer.description("overlay", heatmap.method)
    ds.ImageComments = f"{DISCLAIMER_TEXT}. {method_name} of {heatmap.label}, p={heatmap.probability:.3f}"
    mark_derived(ds, [source], producer, f"{method_name} heatmap of '{heatmap.label}' "
                 f"(layer {heatmap.layer}) blended over the source image. {describe_layout(layout)}")
    return ds


def capture(source: Dataset, pixels: np.ndarray, producer: Producer, method: str, frame: int,
            parts: tuple[str, ...], instance_number: int, factor: int | None) -> Dataset:
    """An overlay's Secondary Capture Image in ``source``'s (cleaned) study: one series per (source
    series, pipeline, method), the instance UID from the source instance, ``frame`` and ``parts``,
    the source (and frame) as Source Image. ``factor``: how much the image part is scaled up, which
    Pixel Spacing is divided by; None leaves Pixel Spacing out (pictures at several scales).
    Callers add the Series Description, Image Comments and provenance (:func:`mark_derived`)."""
    spacing = pixel_spacing(source) if factor is not None else None
    ds = SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=producer.series_uid("sc", source, method),
        series_number=producer.series_number("sc", method),
        sop_instance_uid=producer.instance_uid("sc", source, method, source.SOPInstanceUID, str(frame),
                                               *parts),
        instance_number=instance_number, manufacturer=producer.manufacturer,
        # highdicom insists on an orientation for the PATIENT coordinate system; the real one (or
        # none) is set right after
        pixel_spacing=None if spacing is None or not factor else (spacing[0] / factor, spacing[1] / factor),
        patient_orientation=orientation(source) or ("L", "F"),
        laterality=source.get("Laterality") or None,
        **patient_and_study(source),
    )
    ds.PatientOrientation = list(orientation(source) or [])  # unknown stays empty (Type 2C), not guessed
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "YES"
    ds.ConversionType = "WSD"  # made by a workstation, not digitised
    ds.RecognizableVisualFeatures = source.get("RecognizableVisualFeatures", "NO")
    reference = source_reference(source)
    if multi_frame(source):
        reference.ReferencedFrameNumber = frame + 1
    ds.SourceImageSequence = [reference]
    return ds


def describe_layout(layout: Layout) -> str:
    """Where the image and the annotations are in the SC, for its Derivation Description."""
    rows, columns = layout.image_slices
    text = (f"Rows 1-{layout.top}: annotation band (notice, model, colour scale), outside the image; "
            f"source image at rows {rows.start + 1}-{rows.stop}, columns {columns.start + 1}-{columns.stop}")
    if layout.factor > 1:
        factor = layout.factor
        return f"{text}, scaled up x{factor} (nearest neighbour; Pixel Spacing divided by {factor})"
    return f"{text}, at native resolution"

"""The picture of one prototype explanation: the region on the image beside the prototype's patch.

Pure: arrays in, an RGB array out (the SC's pixels). The annotation band on top follows the
overlays' rules (:mod:`dicom_node.encode.layout`: disclaimer first, text never over the image,
small images scaled up); below it, side by side, the source image with the prototype's
similarity map blended in and the most similar region boxed, and the training patch the
prototype stands for, scaled to the image's height, framed in the same colour.
"""

import cv2
import numpy as np

from dicom_node.encode.common import DISCLAIMER
from dicom_node.encode.layout import Layout, Line, draw_band, plan, scale_factor
from dicom_node.encode.overlay import BLEND, COLOUR_MAP, CONTOUR, DISCLAIMER_COLOUR, TEXT_COLOUR
from dicom_node.explain.prototypes import PrototypeEvidence

GAP = 8  # pixels of black between the image and the patch, before scaling


def _colours(values: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.applyColorMap(values, COLOUR_MAP), cv2.COLOR_BGR2RGB)


def blend_similarity(display: np.ndarray, native_map: np.ndarray) -> np.ndarray:
    """``display`` (rows, columns, 3) uint8 with the map, min-max scaled, blended in."""
    values = np.nan_to_num(native_map.astype(np.float32))
    low, high = float(values.min()), float(values.max())
    relative = (values - low) / (high - low) if high > low else np.zeros_like(values)
    colours = _colours(np.round(relative * 255).astype(np.uint8)).astype(np.float32)
    alpha = (BLEND * relative)[..., None]
    return np.round(display * (1 - alpha) + colours * alpha).astype(np.uint8)


def _patch_rgb(patch: np.ndarray, height: int) -> np.ndarray:
    """The patch (float in [0, 1], or uint8) as RGB uint8, ``height`` rows, aspect kept (nearest)."""
    gray = patch if patch.dtype == np.uint8 else np.clip(patch * 255.0 + 0.5, 0, 255).astype(np.uint8)
    width = max(1, round(gray.shape[1] * height / gray.shape[0]))
    resized = cv2.resize(gray, (width, height), interpolation=cv2.INTER_NEAREST)
    return np.repeat(resized[..., None], 3, axis=2) if resized.ndim == 2 else resized


def render_prototype_overlay(display: np.ndarray, evidence: PrototypeEvidence, patch: np.ndarray,
                             model: str, version: str, notes: tuple[str, ...] = ()) -> np.ndarray:
    """The SC's pixels: band, then the image with the similarity map and the region, and the patch
    (:func:`prototype_picture`'s pixels)."""
    return prototype_picture(display, evidence, patch, model, version, notes)[0]


def prototype_picture(display: np.ndarray, evidence: PrototypeEvidence, patch: np.ndarray, model: str,
                      version: str, notes: tuple[str, ...] = ()) -> tuple[np.ndarray, Layout, int]:
    """The SC's pixels, where the band and the pictures are (the layout's image part is the image
    beside the patch) and the factor the source image was scaled up by.

    Parameters
    ----------
    display
        The source frame as a viewer shows it, (rows, columns, 3) uint8.
    evidence
        One prototype's evidence; its ``native_map`` must be on ``display``'s grid.
    patch
        The prototype's training patch (:func:`dicom_node.explain.prototypes.prototype_patch`).
    notes
        Extra banner lines (the input-distribution gate's warning).

    Raises
    ------
    ValueError
        If the map is not on the display's grid, or the patch is empty.
    """
    if display.ndim != 3 or display.shape[2] != 3 or display.shape[:2] != evidence.native_map.shape:
        raise ValueError(f"display: expected (rows, columns, 3) on the map's grid "
                         f"{evidence.native_map.shape}, got {display.shape}")
    if patch.size == 0:
        raise ValueError("patch: the prototype's patch is empty")
    rows, columns = display.shape[:2]
    image = blend_similarity(display, evidence.native_map)
    right = _patch_rgb(patch, rows)
    side = np.zeros((rows, columns + GAP + right.shape[1], 3), np.uint8)
    side[:, :columns], side[:, columns + GAP:] = image, right
    factor = scale_factor(rows, side.shape[1])
    if factor > 1:
        side = np.repeat(np.repeat(side, factor, axis=0), factor, axis=1)
    width = max(1, round(min(side.shape[:2]) / 250))
    x0, y0, x1, y1 = (round(v * factor) for v in evidence.region_source)
    cv2.rectangle(side, (x0, y0), (x1 - 1, y1 - 1), CONTOUR, width)
    cv2.rectangle(side, ((columns + GAP) * factor, 0), (side.shape[1] - 1, side.shape[0] - 1), CONTOUR, width)
    height, total = side.shape[:2]
    lines = [*_lines(evidence, model, version, factor), *(Line(note, DISCLAIMER_COLOUR) for note in notes)]
    layout = plan(height, total, lines, "similarity, min to max:")
    canvas = np.zeros((layout.rows, layout.columns, 3), np.uint8)
    canvas[layout.image_slices] = side
    draw_band(canvas, layout, _colours(np.arange(256, dtype=np.uint8)[:, None])[:, 0])
    return canvas, layout, factor


def _lines(evidence: PrototypeEvidence, model: str, version: str, factor: int) -> list[Line]:
    p = evidence.identity
    scaled = f" · scaled up x{factor}" if factor > 1 else ""
    shows = "shows the finding" if p.shows_finding else "does not show the finding"
    return [
        Line(DISCLAIMER, DISCLAIMER_COLOUR),
        Line(f"{model} {version} · prototype {p.prototype} of {evidence.label} · "
             f"similarity {evidence.similarity:.2f} · weight {evidence.weight:.2f}{scaled}", TEXT_COLOUR),
        Line(f"this region looks like that training patch: phantom seed {p.seed}, box "
             f"{', '.join(map(str, p.box_source))} at {p.render_size} px; the patch {shows}", TEXT_COLOUR),
    ]

"""Rasterising a phantom: shapes evaluated at pixel centres, then exposure, blur and noise.

Random streams (all from ``np.random.default_rng``, none global): ``[seed, 0]`` draws the geometry
(anatomy, then every finding's geometry), ``[seed, 1]`` the labels when ``findings`` is None, and
``[seed, 2, size]`` the noise. Geometry lives in normalised coordinates, so the same seed gives the
same patient and findings at every size; only the noise differs between sizes.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial

import cv2
import numpy as np

from dicom_node.phantoms.anatomy import RIGHT, Anatomy, sample_anatomy
from dicom_node.phantoms.findings import (
    FIELD_MM,
    LABELS,
    Consolidation,
    FindingGeometry,
    Meniscus,
    sample_findings,
)
from dicom_node.phantoms.shapes import Box, Ellipse, Shape

PRIOR = 0.4  # chance of each finding when the labels come from the seed
MIN_SIZE = 32
_AERATION_GRID = 128  # lung thickness is a blurred lung field, worked out on this coarse grid
_BLUR_MM = 0.35
_NOISE_AT_256 = 0.0045  # noise standard deviation at 256 px, growing as sqrt(size)

Field = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class Phantom:
    """One rendered phantom radiograph and its ground truth.

    Attributes
    ----------
    image
        float32 in [0, 1], shape (size, size); 1 is most attenuating (bright on MONOCHROME2).
    masks
        Label to bool mask (size, size), only for the findings present, exact for ``image``.
    labels
        Every label in ``LABELS`` to whether it is present.
    seed
        The seed it was rendered from.
    pixel_spacing_mm
        Size of one pixel: ``FIELD_MM / size``.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    labels: dict[str, bool]
    seed: int
    pixel_spacing_mm: float

    @property
    def size(self) -> int:
        return int(self.image.shape[0])


class Grid:
    """Pixel centres of a ``size`` x ``size`` image, evaluated a bounding box at a time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._centres = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)

    def window(self, box: Box) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
        """Slices of the pixels whose centres may fall in ``box``, and their centres as X (1, w), Y (h, 1)."""
        n = self.size
        x0, x1, y0, y1 = (min(max(v * n, -1.0), n + 1.0) for v in box)
        i0, i1 = max(math.floor(x0), 0), min(math.ceil(x1) + 1, n)
        j0, j1 = max(math.floor(y0), 0), min(math.ceil(y1) + 1, n)
        if i0 >= i1 or j0 >= j1:
            return None
        return (slice(j0, j1), slice(i0, i1)), self._centres[None, i0:i1], self._centres[j0:j1, None]

    def add(self, canvas: np.ndarray, box: Box, field: Field, combine: np.ufunc = np.add) -> None:
        """Combine ``field`` into ``canvas`` inside ``box`` (add, or e.g. ``np.maximum``)."""
        win = self.window(box)
        if win is not None:
            sl, x, y = win
            combine(canvas[sl], field(x, y), out=canvas[sl])

    def mask(self, box: Box, inside: Field) -> np.ndarray:
        """A full-size bool mask of ``inside``, evaluated only inside ``box``."""
        out = np.zeros((self.size, self.size), dtype=bool)
        win = self.window(box)
        if win is not None:
            sl, x, y = win
            out[sl] = inside(x, y)
        return out


def _labels(seed: int, findings: Mapping[str, bool] | None) -> dict[str, bool]:
    if findings is None:
        draws = np.random.default_rng([seed, 1]).random(len(LABELS))
        return {label: bool(d < PRIOR) for label, d in zip(LABELS, draws, strict=True)}
    unknown = sorted(set(findings) - set(LABELS))
    if unknown:
        raise ValueError(f"findings: unknown label(s) {unknown}; expected some of {list(LABELS)}")
    return {label: bool(findings.get(label, False)) for label in LABELS}


def _lung_fields(grid: Grid, anatomy: Anatomy, heart: Ellipse) -> tuple[np.ndarray, np.ndarray]:
    right, left = (grid.mask(lung.box, partial(anatomy.lung_field, lung, heart)) for lung in anatomy.lungs)
    return right, left


def _darkening(anatomy: Anatomy, heart: Ellipse, field: np.ndarray) -> np.ndarray:
    """How much the air in the lungs lowers the image, less at the thinner lung margins."""
    coarse = Grid(_AERATION_GRID)
    right, left = _lung_fields(coarse, anatomy, heart)
    thickness = cv2.GaussianBlur((right | left).astype(np.float32), (0, 0), 0.045 * _AERATION_GRID)
    size = field.shape[0]
    thickness = cv2.resize(thickness, (size, size), interpolation=cv2.INTER_LINEAR)
    thickness *= 0.65 * anatomy.lung_darkening
    thickness += 0.35 * anatomy.lung_darkening
    return np.where(field, thickness, np.float32(0.0))


def _paint_anatomy(grid: Grid, anatomy: Anatomy, heart: Ellipse, field: np.ndarray,
                   darkening: np.ndarray) -> np.ndarray:
    size = grid.size
    canvas = np.zeros((size, size), dtype=np.float32)
    grid.add(canvas, anatomy.body.box, anatomy.body.field)
    canvas -= darkening
    profile = replace(heart, density=anatomy.heart_density)

    def heart_field(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.where(anatomy.heart_inside(heart, x, y), profile.field(x, y), 0.0)

    grid.add(canvas, heart.box, heart_field)
    knob = replace(anatomy.knob, density=anatomy.heart_density)
    grid.add(canvas, knob.box, knob.field)
    shapes: tuple[Shape, ...] = (anatomy.spine, *anatomy.bones, *anatomy.airways, anatomy.bubble)
    for shape in shapes:
        grid.add(canvas, shape.box, shape.field)
    markings = np.zeros_like(canvas)  # vessels: the densest wins, so forks leave no bright knots
    vessels: tuple[Shape, ...] = (*anatomy.hila, *anatomy.vessels)
    for vessel in vessels:
        grid.add(markings, vessel.box, vessel.field, combine=np.maximum)
    canvas += np.where(field, markings, np.float32(0.0))
    return canvas


def _texture(anatomy: Anatomy, size: int) -> np.ndarray:
    return cv2.resize(anatomy.texture, (size, size), interpolation=cv2.INTER_CUBIC)


def _paint_consolidation(grid: Grid, canvas: np.ndarray, shape: Consolidation, field: np.ndarray,
                         texture: np.ndarray) -> np.ndarray:
    out = np.zeros(canvas.shape, dtype=bool)
    win = grid.window(shape.box)
    if win is None:
        return out
    sl, x, y = win
    opacity = shape.opacity(x, y)
    inside = (opacity > shape.THRESHOLD) & field[sl]
    strength = 0.3 + 0.7 * np.clip((opacity - shape.THRESHOLD) * 2.0, 0.0, 1.0)
    patches = 0.8 + 0.2 * np.clip(texture[sl], -1.5, 1.5)
    canvas[sl] += np.where(inside, shape.contrast * strength * patches, 0.0)
    out[sl] = inside
    return out


def _paint_effusion(grid: Grid, canvas: np.ndarray, meniscus: Meniscus, field: np.ndarray,
                    darkening: np.ndarray) -> np.ndarray:
    out = np.zeros(canvas.shape, dtype=bool)
    win = grid.window(meniscus.box)
    if win is None:
        return out
    sl, x, y = win
    depth = y - meniscus.level(x)
    inside = (depth > 0.0) & field[sl]
    ramp = 0.4 + 0.6 * np.clip(depth * (1.0 / 0.02), 0.0, 1.0)
    canvas[sl] += np.where(inside, meniscus.fraction * ramp * darkening[sl], 0.0)
    out[sl] = inside
    return out


def _paint_findings(grid: Grid, canvas: np.ndarray, geometry: FindingGeometry, labels: dict[str, bool],
                    fields: tuple[np.ndarray, np.ndarray], darkening: np.ndarray,
                    texture: np.ndarray) -> dict[str, np.ndarray]:
    masks = {}
    if labels["nodule"]:
        nodule = geometry.nodule
        grid.add(canvas, nodule.box, nodule.field)
        masks["nodule"] = grid.mask(nodule.box, nodule.inside)
    if labels["consolidation"]:
        shape = geometry.consolidation
        field = fields[0] if shape.side == RIGHT else fields[1]
        masks["consolidation"] = _paint_consolidation(grid, canvas, shape, field, texture)
    if labels["effusion"]:
        parts = [_paint_effusion(grid, canvas, m, fields[0] if m.lung.side == RIGHT else fields[1], darkening)
                 for m in geometry.effusion]
        masks["effusion"] = np.logical_or.reduce(parts)
    return masks


def _finish(canvas: np.ndarray, anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Exposure (gain, offset, smooth variation), detector blur, quantum-like noise, clipping."""
    size = canvas.shape[0]
    gain = np.asarray(cv2.resize(anatomy.background, (size, size), interpolation=cv2.INTER_CUBIC), np.float32)
    gain *= 0.03 * anatomy.gain
    gain += anatomy.gain
    canvas *= gain
    canvas += anatomy.offset
    sigma = max(_BLUR_MM * size / FIELD_MM, 0.5)
    canvas = np.asarray(cv2.GaussianBlur(canvas, (0, 0), sigma), np.float32)
    noise = rng.standard_normal((size, size), dtype=np.float32)
    noise *= np.float32(_NOISE_AT_256 * np.sqrt(size / 256.0))
    noise *= 0.6 + 0.6 * canvas
    canvas += noise
    return np.clip(canvas, 0.0, 1.0, out=canvas)


def render(seed: int, size: int = 2048, findings: Mapping[str, bool] | None = None) -> Phantom:
    """Render the phantom chest radiograph of ``seed`` at ``size`` x ``size`` pixels.

    Parameters
    ----------
    seed
        Non-negative integer; the same seed gives the same patient and findings at every size.
    size
        Image width and height in pixels (the field is always ``FIELD_MM`` wide).
    findings
        Label to present; labels left out are absent. None draws each label from the seed, present
        with probability ``PRIOR``, independently. The findings' geometry depends only on the seed.

    Returns
    -------
    Phantom
        Identical arrays for identical arguments. Masks are the findings' shapes sampled at pixel
        centres; from 128 px up every mask is non-empty (below, an 8 mm nodule may miss every centre).
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise ValueError(f"size: expected an integer >= {MIN_SIZE}, got {size!r}")
    seed, size = int(seed), int(size)
    labels = _labels(seed, findings)
    rng = np.random.default_rng([seed, 0])
    anatomy = sample_anatomy(rng)
    geometry = sample_findings(rng, anatomy)
    heart = geometry.large_heart if labels["cardiomegaly"] else anatomy.heart
    grid = Grid(size)
    heart_mask = grid.mask(heart.box, partial(anatomy.heart_inside, heart))
    fields = _lung_fields(grid, anatomy, heart)
    field = fields[0] | fields[1]
    darkening = _darkening(anatomy, heart, field)
    canvas = _paint_anatomy(grid, anatomy, heart, field, darkening)
    texture = _texture(anatomy, size)
    canvas += np.where(field, 0.02 * texture, np.float32(0.0))
    masks = _paint_findings(grid, canvas, geometry, labels, fields, darkening, texture)
    if labels["cardiomegaly"]:
        masks["cardiomegaly"] = heart_mask
    image = _finish(canvas, anatomy, np.random.default_rng([seed, 2, size]))
    return Phantom(image, masks, labels, seed, FIELD_MM / size)

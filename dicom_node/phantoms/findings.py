"""The four findings' geometry, drawn from a seed whether or not each finding is shown.

Drawing every finding's geometry for every seed keeps the patient the same when a finding is switched
on or off (``render(seed, findings=...)``): a counterfactual pair differs only in that finding.
Nodule and consolidation are placed above the effusion level, away from each other and off the
enlarged heart, so no finding hides another.
"""

import math
from dataclasses import dataclass

import numpy as np

from dicom_node.phantoms.anatomy import LEFT, RIGHT, Anatomy, uniform
from dicom_node.phantoms.shapes import Box, Ellipse, Lung

LABELS: tuple[str, ...] = ("nodule", "consolidation", "effusion", "cardiomegaly")
FIELD_MM = 430.0  # the detector's width and height
_RING = np.linspace(0.0, 2.0 * math.pi, 16, endpoint=False)


@dataclass(frozen=True)
class Nodule:
    """A round nodule; its mask is the disc."""

    cx: float
    cy: float
    radius: float
    contrast: float

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - self.cx, y - self.cy
        return dx * dx + dy * dy <= self.radius * self.radius

    def field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - self.cx, y - self.cy
        v = 1.0 - (dx * dx + dy * dy) * (1.0 / self.radius**2)
        return np.where(v >= 0.0, self.contrast * (0.45 + 0.55 * np.sqrt(np.maximum(v, 0.0))), 0.0)

    @property
    def box(self) -> Box:
        r = self.radius
        return (self.cx - r, self.cx + r, self.cy - r, self.cy + r)


@dataclass(frozen=True)
class Consolidation:
    """Overlapping compact blobs in one lung; the mask is where their sum passes ``THRESHOLD``."""

    side: int
    blobs: tuple[tuple[float, float, float], ...]  # cx, cy, radius
    contrast: float

    THRESHOLD = 0.2

    def opacity(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        total = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=np.result_type(x, y))
        for cx, cy, r in self.blobs:
            dx, dy = x - cx, y - cy
            v = np.maximum(1.0 - (dx * dx + dy * dy) * (1.0 / r**2), 0.0)
            total += v * v
        return total

    @property
    def box(self) -> Box:
        return (min(cx - r for cx, _, r in self.blobs), max(cx + r for cx, _, r in self.blobs),
                min(cy - r for _, cy, r in self.blobs), max(cy + r for _, cy, r in self.blobs))


@dataclass(frozen=True)
class Meniscus:
    """Fluid in one pleural space, up to a meniscus that climbs the lateral chest wall."""

    lung: Lung
    top_y: float  # level at the lateral wall
    depth: float  # how much lower the level lies at the medial border
    fraction: float  # share of the lung's aeration the fluid takes away

    def level(self, x: np.ndarray) -> np.ndarray:
        lung = self.lung
        q = np.clip((lung.side * (x - lung.mid) - lung.u_medial) / (lung.u_lateral - lung.u_medial), 0.0, 1.0)
        return self.top_y + self.depth * (1.0 - q * q)

    @property
    def box(self) -> Box:
        x0, x1, _, y1 = self.lung.box
        return (x0, x1, self.top_y, y1)


@dataclass(frozen=True)
class FindingGeometry:
    """Where each finding would be, for one seed."""

    nodule: Nodule
    consolidation: Consolidation
    effusion: tuple[Meniscus, ...]
    large_heart: Ellipse


def enlarge_heart(anatomy: Anatomy, ratio: float) -> Ellipse:
    """The patient's heart grown to cardiothoracic ratio ``ratio``, still resting on the diaphragm."""
    heart = anatomy.heart
    k = ratio / anatomy.cardiothoracic_ratio(heart)
    hx, hy = heart.half_extent
    rest_y = heart.cy + 0.65 * hy
    cx, cy = heart.cx + 0.35 * (k - 1.0) * hx, rest_y - 0.65 * k * hy
    return Ellipse(cx, cy, k * heart.a, k * heart.b, heart.angle)


def _effusion(rng: np.random.Generator, anatomy: Anatomy) -> tuple[Meniscus, ...]:
    """Fluid over the whole dome of one or both sides, highest at the lateral wall."""
    sides = ((RIGHT,), (LEFT,), (RIGHT, LEFT))[int(rng.choice(3, p=[0.4, 0.4, 0.2]))]
    menisci = []
    for lung in anatomy.lungs:
        above_dome, depth = uniform(rng, 0.01, 0.07), uniform(rng, 0.04, 0.08)
        fraction = uniform(rng, 0.85, 0.97)
        if lung.side in sides:
            top = lung.base_y - lung.dome_height - above_dome - depth
            menisci.append(Meniscus(lung, top, depth, fraction))
    return tuple(menisci)


def _fits(anatomy: Anatomy, heart: Ellipse, lung: Lung, cx: np.ndarray, cy: np.ndarray,
          radius: float) -> np.ndarray:
    """Which candidate centres have their whole circle of ``radius`` inside the lung field."""
    x = cx[:, None] + radius * np.cos(_RING)[None, :]
    y = cy[:, None] + radius * np.sin(_RING)[None, :]
    x, y = np.concatenate([cx[:, None], x], axis=1), np.concatenate([cy[:, None], y], axis=1)
    return np.asarray(anatomy.lung_field(lung, heart, x, y).all(axis=1))


def _place(rng: np.random.Generator, anatomy: Anatomy, heart: Ellipse, radius: float, ceiling: float,
           avoid: tuple[float, float, float] | None = None) -> tuple[Lung, float, float]:
    """A lung and a centre whose circle fits in its field above ``ceiling``, clear of ``avoid``."""
    for _ in range(20):
        lung = anatomy.lungs[int(rng.integers(2))]
        x0, x1, y0, _ = lung.box
        cx = rng.uniform(x0, x1, 64)
        cy = rng.uniform(y0, max(ceiling - radius, y0 + 0.05), 64)
        ok = _fits(anatomy, heart, lung, cx, cy, radius)
        if avoid is not None:
            ok &= np.hypot(cx - avoid[0], cy - avoid[1]) > radius + avoid[2]
        if ok.any():
            i = int(np.argmax(ok))
            return lung, float(cx[i]), float(cy[i])
    lung = anatomy.right
    return lung, lung.mid - 0.5 * (lung.u_medial + lung.u_lateral), 0.5 * (lung.apex_y + ceiling)


def _consolidation(rng: np.random.Generator, anatomy: Anatomy, heart: Ellipse,
                   ceiling: float) -> Consolidation:
    extent = uniform(rng, 40.0, 100.0) / FIELD_MM / 2.0
    lung, cx, cy = _place(rng, anatomy, heart, 0.6 * extent, ceiling)
    blobs = []
    for _ in range(int(rng.integers(3, 7))):
        angle, reach = uniform(rng, 0.0, 2.0 * math.pi), uniform(rng, 0.0, 0.5) * extent
        radius = uniform(rng, 0.8, 1.1) * extent
        blobs.append((cx + reach * math.cos(angle), cy + reach * math.sin(angle), radius))
    return Consolidation(lung.side, tuple(blobs), uniform(rng, 0.24, 0.32))


def sample_findings(rng: np.random.Generator, anatomy: Anatomy) -> FindingGeometry:
    """Draw all four findings' geometry for ``anatomy`` from ``rng`` (after the anatomy).

    Parameters
    ----------
    rng
        The geometry stream that drew ``anatomy``.
    anatomy
        The patient.

    Returns
    -------
    FindingGeometry
    """
    large_heart = enlarge_heart(anatomy, uniform(rng, 0.58, 0.68))
    effusion = _effusion(rng, anatomy)
    ceiling = min(m.top_y for m in effusion) - 0.02
    consolidation = _consolidation(rng, anatomy, large_heart, ceiling)
    radius = uniform(rng, 8.0, 30.0) / FIELD_MM / 2.0
    ccx, ccy, _ = consolidation.blobs[0]
    avoid = (ccx, ccy, 0.03 + max(math.hypot(bx - ccx, by - ccy) + r for bx, by, r in consolidation.blobs))
    _, nx, ny = _place(rng, anatomy, large_heart, radius + 0.012, ceiling, avoid)
    nodule = Nodule(nx, ny, radius, uniform(rng, 0.16, 0.26))
    return FindingGeometry(nodule, consolidation, effusion, large_heart)

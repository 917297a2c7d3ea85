"""Shapes of the phantom, in normalised image coordinates.

``x`` runs from the image's left edge (0) to its right edge (1) and ``y`` from top (0) to bottom (1).
A PA chest shows the patient's right on the image's left, so ``side = -1`` is the patient's right and
``side = +1`` the patient's left; ``u = side * (x - mid)`` is the distance from the midline towards
that side's chest wall.

Every shape evaluates on broadcastable coordinate arrays: a raster window (``X`` of shape ``(1, w)``,
``Y`` of shape ``(h, 1)``, pixel centres) or a set of points (two arrays of one shape). The same code
therefore draws a shape at any size and tests whether points lie inside it, which is what makes the
phantom resolution independent and its masks exact.
"""

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Box = tuple[float, float, float, float]  # x0, x1, y0, y1
Coords = np.ndarray | float


class Shape(Protocol):
    """Anything drawn by adding its density ``field`` inside its bounding ``box``."""

    @property
    def box(self) -> Box: ...

    def field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...


def ease(v: Coords) -> np.ndarray:
    """Quarter ellipse from (0, 0) to (1, 1): a rounded rise, flat beyond 1."""
    w = 1.0 - np.clip(v, 0.0, 1.0)
    return np.sqrt(1.0 - w * w)


def _side_box(mid: float, side: int, u0: float, u1: float, y0: float, y1: float) -> Box:
    xa, xb = mid + side * u0, mid + side * u1
    return (min(xa, xb), max(xa, xb), y0, y1)


@dataclass(frozen=True)
class Lung:
    """One lung field: rounded apex, curved lateral wall, diaphragm dome below.

    The lateral wall meets the dome at ``base_y`` in a sharp costophrenic angle.
    """

    side: int
    mid: float
    apex_y: float
    base_y: float
    u_medial: float
    u_apex: float
    u_lateral: float
    dome_height: float
    dome_u: float

    def diaphragm_y(self, u: Coords) -> np.ndarray:
        """Height of the dome below the lung at lateral distance ``u``."""
        span = np.where(u >= self.dome_u, self.u_lateral - self.dome_u, (self.dome_u - self.u_medial) / 0.55)
        q = (u - self.dome_u) / span
        return self.base_y - self.dome_height * (1.0 - q * q)

    def lateral_u(self, y: Coords) -> np.ndarray:
        """Lateral distance of the lung's outer wall at height ``y``."""
        t = (y - self.apex_y) / (self.base_y - self.apex_y)
        rise = 0.45 * ease(t / 0.25) + 0.55 * np.clip(t / 0.85, 0.0, 1.0) ** 0.8
        return self.u_apex + (self.u_lateral - self.u_apex) * rise

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u = self.side * (x - self.mid)
        t = (y - self.apex_y) / (self.base_y - self.apex_y)
        u_medial = self.u_medial * (0.8 + 0.2 * np.clip(t, 0.0, 1.0))
        medial = self.u_apex - (self.u_apex - u_medial) * ease(t / 0.22)
        return (t >= 0) & (u > medial) & (u < self.lateral_u(y)) & (y < self.diaphragm_y(u))

    @property
    def box(self) -> Box:
        return _side_box(self.mid, self.side, 0.8 * self.u_medial, self.u_lateral, self.apex_y, self.base_y)


@dataclass(frozen=True)
class Ellipse:
    """A rotated ellipse; ``density`` scales its dome-shaped (spherical) thickness profile."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float = 0.0
    density: float = 0.0

    def level(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Squared normalised radius: below 1 inside."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.cx, y - self.cy
        p, q = (dx * c + dy * s) / self.a, (dy * c - dx * s) / self.b
        return p * p + q * q

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.level(x, y) <= 1.0

    def field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.density * np.sqrt(np.clip(1.0 - self.level(x, y), 0.0, 1.0))

    @property
    def half_extent(self) -> tuple[float, float]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        return (math.hypot(self.a * c, self.b * s), math.hypot(self.a * s, self.b * c))

    @property
    def box(self) -> Box:
        hx, hy = self.half_extent
        return (self.cx - hx, self.cx + hx, self.cy - hy, self.cy + hy)


@dataclass(frozen=True)
class Blob:
    """A Gaussian density (hilar shadows)."""

    cx: float
    cy: float
    sigma: float
    density: float

    def field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - self.cx, y - self.cy
        return self.density * np.exp((dx * dx + dy * dy) * (-0.5 / self.sigma**2))

    @property
    def box(self) -> Box:
        r = 3.0 * self.sigma
        return (self.cx - r, self.cx + r, self.cy - r, self.cy + r)


@dataclass(frozen=True)
class Band:
    """A curved bone band (rib, clavicle) around ``y = y0 + c1 u + c2 u^2`` for ``u0 <= u <= u1``.

    ``rim`` brightens the edges like cortical bone; both ends fade out over ``fade``.
    """

    side: int
    mid: float
    y0: float
    c1: float
    c2: float
    u0: float
    u1: float
    thickness: float
    density: float
    rim: float = 0.3
    fade: float = 0.025

    def centre_y(self, u: np.ndarray) -> np.ndarray:
        return self.y0 + self.c1 * u + self.c2 * u * u

    def field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u = self.side * (x - self.mid)
        slope = self.c1 + 2.0 * self.c2 * u
        scale = (2.0 / self.thickness) / np.sqrt(1.0 + slope * slope)
        ends = np.minimum(np.minimum(u - self.u0, self.u1 - u) * (1.0 / self.fade), 1.0)
        weight = self.density * np.maximum(ends, 0.0)
        d = (y - self.centre_y(u)) * scale
        d2 = d * d
        return np.where(d2 < 1.0, weight * ((1.0 - self.rim) + self.rim * d2), 0.0)

    @property
    def box(self) -> Box:
        ends = [self.u0, self.u1]
        vertex = -self.c1 / (2.0 * self.c2) if self.c2 else self.u0
        ys = [self.y0 + self.c1 * u + self.c2 * u * u for u in [*ends, min(max(vertex, self.u0), self.u1)]]
        slope = max(abs(self.c1 + 2.0 * self.c2 * u) for u in ends)
        pad = 0.5 * self.thickness * math.sqrt(1.0 + slope * slope)
        return _side_box(self.mid, self.side, self.u0, self.u1, min(ys) - pad, max(ys) + pad)


@dataclass(frozen=True)
class Segment:
    """A tapering tube from ``a`` to ``b`` (vessels, airways) with a cylindrical profile."""

    xa: float
    ya: float
    xb: float
    yb: float
    width_a: float
    width_b: float
    density: float

    def field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = self.xb - self.xa, self.yb - self.ya
        px, py = x - self.xa, y - self.ya
        t = np.minimum(np.maximum((px * dx + py * dy) * (1.0 / (dx * dx + dy * dy)), 0.0), 1.0)
        ex, ey = px - t * dx, py - t * dy
        w = self.width_a + (self.width_b - self.width_a) * t
        v = np.maximum(1.0 - (ex * ex + ey * ey) / (w * w), 0.0)
        return (self.density * (1.0 - 0.4 * t)) * np.sqrt(v)

    @property
    def box(self) -> Box:
        w = max(self.width_a, self.width_b)
        return (min(self.xa, self.xb) - w, max(self.xa, self.xb) + w,
                min(self.ya, self.yb) - w, max(self.ya, self.yb) + w)


@dataclass(frozen=True)
class Body:
    """The trunk: neck widening into the shoulders, elliptical cross-section (thicker centrally)."""

    mid: float
    neck_half: float
    shoulder_y: float
    shoulder_half: float
    density: float

    def half_width(self, y: np.ndarray) -> np.ndarray:
        s = np.clip((y - self.shoulder_y) / 0.12 + 1.0, 0.0, 1.0)
        waist = 1.0 - 0.08 * np.square(np.maximum(y - 0.45, 0.0) / 0.55)
        return (self.neck_half + (self.shoulder_half - self.neck_half) * (s * s * (3.0 - 2.0 * s))) * waist

    def field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = (x - self.mid) / self.half_width(y)
        return self.density * np.sqrt(np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0)))

    @property
    def box(self) -> Box:
        return (self.mid - self.shoulder_half, self.mid + self.shoulder_half, 0.0, 1.0)


@dataclass(frozen=True)
class Spine:
    """The vertebral column: a cylinder whose density dips at each disc space."""

    mid: float
    half_width: float
    period: float
    phase: float
    density: float

    def field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = (x - self.mid) / self.half_width
        across = self.density * np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
        f = np.mod(y / self.period + self.phase, 1.0) - 0.5
        along = 1.0 - 0.45 * np.exp(-(f * f) * (1.0 / 0.07**2))
        return along * across

    @property
    def box(self) -> Box:
        return (self.mid - self.half_width, self.mid + self.half_width, 0.0, 1.0)

"""A normal frontal (PA) chest, drawn at random from a seed: the geometry, not the pixels.

Densities are in image units (0 air, 1 most attenuating) before exposure, blur and noise: soft tissue
about 0.58, aerated lung about 0.15-0.2, ribs about +0.1 over the lung.
"""

import math
from dataclasses import dataclass

import numpy as np

from dicom_node.phantoms.shapes import Band, Blob, Body, Ellipse, Lung, Segment, Spine

RIGHT, LEFT = -1, 1  # the patient's sides; right is on the image's left in a PA view


@dataclass(frozen=True)
class Anatomy:
    """Everything of one phantom patient except the findings."""

    mid: float
    body: Body
    right: Lung
    left: Lung
    heart: Ellipse
    knob: Ellipse
    spine: Spine
    bones: tuple[Band, ...]
    airways: tuple[Segment, ...]
    vessels: tuple[Segment, ...]
    hila: tuple[Blob, ...]
    bubble: Ellipse
    lung_darkening: float
    heart_density: float
    texture: np.ndarray  # small grid of unit noise: lung markings, upsampled to the image
    background: np.ndarray  # coarser grid: smooth exposure variation
    gain: float
    offset: float

    @property
    def lungs(self) -> tuple[Lung, Lung]:
        return (self.right, self.left)

    @property
    def thoracic_width(self) -> float:
        """Inner width of the chest at its widest, for the cardiothoracic ratio."""
        return self.right.u_lateral + self.left.u_lateral

    def diaphragm_y(self, x: np.ndarray) -> np.ndarray:
        """The diaphragm line across the image: the domes, joined straight across the mediastinum."""
        r, le = self.right, self.left
        x_right, x_left = self.mid - r.u_medial, self.mid + le.u_medial
        y_right, y_left = float(r.diaphragm_y(r.u_medial)), float(le.diaphragm_y(le.u_medial))
        t = np.clip((x - x_right) / (x_left - x_right), 0.0, 1.0)
        middle = y_right + (y_left - y_right) * t
        return np.where(x <= x_right, r.diaphragm_y(self.mid - x),
                        np.where(x >= x_left, le.diaphragm_y(x - self.mid), middle))

    def heart_inside(self, heart: Ellipse, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The cardiac silhouette: the heart ellipse above the diaphragm."""
        return heart.inside(x, y) & (y < self.diaphragm_y(x))

    def lung_field(self, lung: Lung, heart: Ellipse, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Aerated lung visible on the film: the lung less the heart and aortic knob."""
        return lung.inside(x, y) & ~self.heart_inside(heart, x, y) & ~self.knob.inside(x, y)

    def cardiothoracic_ratio(self, heart: Ellipse) -> float:
        return 2.0 * heart.half_extent[0] / self.thoracic_width


def uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _lungs(rng: np.random.Generator, mid: float) -> tuple[Lung, Lung]:
    apex, base = uniform(rng, 0.10, 0.14), uniform(rng, 0.79, 0.84)
    width = uniform(rng, 0.34, 0.385)
    dome = uniform(rng, 0.075, 0.11)
    lungs = []
    for side, lift, peak in ((RIGHT, uniform(rng, 0.01, 0.035), 0.17), (LEFT, 0.0, 0.21)):
        medial = uniform(rng, 0.07, 0.085)
        lungs.append(Lung(
            side=side, mid=mid, apex_y=apex + uniform(rng, -0.008, 0.008), base_y=base - lift,
            u_medial=medial, u_apex=medial + uniform(rng, 0.07, 0.1),
            u_lateral=width + uniform(rng, -0.01, 0.01),
            dome_height=dome + uniform(rng, -0.01, 0.01), dome_u=peak + uniform(rng, 0.0, 0.04),
        ))
    return lungs[0], lungs[1]


def _heart(rng: np.random.Generator, mid: float, left: Lung, width: float, ratio: float) -> Ellipse:
    """A heart with cardiothoracic ratio ``ratio`` whose lower part sinks behind the left dome."""
    angle, aspect = uniform(rng, 0.3, 0.55), uniform(rng, 0.8, 0.92)
    half = 0.5 * ratio * width
    a = half / math.hypot(math.cos(angle), aspect * math.sin(angle))
    heart = Ellipse(mid + uniform(rng, 0.12, 0.2) * 2.0 * half, 0.0, a, aspect * a, angle)
    rest_y = left.base_y - left.dome_height + uniform(rng, 0.0, 0.03)
    return Ellipse(heart.cx, rest_y - uniform(rng, 0.6, 0.72) * heart.half_extent[1], heart.a, heart.b, angle)


def _ribs(rng: np.random.Generator, lungs: tuple[Lung, Lung]) -> list[Band]:
    """Ten posterior ribs (arching from the spine) and six fainter anterior ribs per side."""
    top, step = uniform(rng, 0.075, 0.095), uniform(rng, 0.058, 0.066)
    thick, density = uniform(rng, 0.017, 0.021), uniform(rng, 0.08, 0.11)
    front_top = uniform(rng, 0.17, 0.2)
    bands = []
    for lung in lungs:
        for i in range(10):
            y0 = top + i * step + uniform(rng, -0.004, 0.004)
            peak, beta = 0.08 + 0.005 * i, 2.8 - 0.13 * i
            u1 = float(lung.lateral_u(y0 + 0.06)) + 0.035
            bands.append(Band(lung.side, lung.mid, y0, -2.0 * beta * peak, beta, 0.045, u1,
                              thick, density, rim=0.4))
        for i in range(6):
            ya = front_top + i * 0.07 + uniform(rng, -0.005, 0.005)
            u1 = float(lung.lateral_u(ya)) + 0.02
            bands.append(Band(lung.side, lung.mid, ya + 0.45 * 0.3 - 0.2 * 0.09, -0.45, 0.2, 0.12, u1,
                              0.8 * thick, 0.45 * density, rim=0.3, fade=0.05))
    return bands


def _clavicles(rng: np.random.Generator, mid: float) -> list[Band]:
    y0, thick, density = uniform(rng, 0.15, 0.18), uniform(rng, 0.02, 0.025), uniform(rng, 0.1, 0.13)
    return [Band(side, mid, y0 + uniform(rng, -0.006, 0.006), -0.22, 0.3, 0.025, uniform(rng, 0.29, 0.33),
                 thick, density, rim=0.35) for side in (RIGHT, LEFT)]


def _airways(rng: np.random.Generator, mid: float) -> tuple[tuple[Segment, ...], float]:
    carina = uniform(rng, 0.3, 0.34)
    trachea = Segment(mid, 0.0, mid, carina, 0.017, 0.016, -0.09)
    right = Segment(mid, carina, mid - uniform(rng, 0.05, 0.065), carina + uniform(rng, 0.04, 0.055),
                    0.011, 0.009, -0.06)
    left = Segment(mid, carina, mid + uniform(rng, 0.065, 0.08), carina + uniform(rng, 0.03, 0.04),
                   0.01, 0.008, -0.06)
    return (trachea, right, left), carina


def _vessel_tree(rng: np.random.Generator, x: float, y: float, side: int) -> list[Segment]:
    """Five trunks fanning out laterally from a hilum; each forks, then runs on, thinning and fading."""
    tips = []
    for base_angle in (-70.0, -35.0, 0.0, 35.0, 70.0):
        start = (x + side * uniform(rng, 0.0, 0.02), y + uniform(rng, -0.03, 0.03))
        tips.append((start, math.radians(base_angle + uniform(rng, -12.0, 12.0))))
    vessels = []
    for length, width, density, signs in ((0.08, 0.007, 0.055, (-1, 1)), (0.07, 0.0045, 0.045, (0,)),
                                          (0.06, 0.003, 0.035, ())):
        forks = []
        for (xs, ys), angle in tips:
            reach = length * uniform(rng, 0.75, 1.25)
            xe, ye = xs + side * reach * math.cos(angle), ys + reach * math.sin(angle)
            vessels.append(Segment(xs, ys, xe, ye, width, 0.75 * width, density))
            forks += [((xe, ye), angle + math.radians(sign * 22.0 + uniform(rng, -10.0, 10.0)))
                      for sign in signs]
        tips = forks
    return vessels


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's normal anatomy from ``rng``.

    Parameters
    ----------
    rng
        The geometry stream; only normalised coordinates are drawn from it, so the same stream gives
        the same anatomy at every image size.

    Returns
    -------
    Anatomy
    """
    mid = 0.5 + uniform(rng, -0.015, 0.015)
    right, left = _lungs(rng, mid)
    width = right.u_lateral + left.u_lateral
    heart = _heart(rng, mid, left, width, uniform(rng, 0.42, 0.48))
    shoulders = min(max(right.u_lateral, left.u_lateral) + uniform(rng, 0.07, 0.1), 0.49)
    body = Body(mid, uniform(rng, 0.08, 0.1), uniform(rng, 0.1, 0.14), shoulders, uniform(rng, 0.56, 0.62))
    airways, carina = _airways(rng, mid)
    hila = (Blob(mid - right.u_medial - 0.03, carina + 0.07, 0.028, 0.05),
            Blob(mid + left.u_medial + 0.03, carina + 0.05, 0.028, 0.05))
    vessels = [v for side, hilum in zip((RIGHT, LEFT), hila, strict=True)
               for v in _vessel_tree(rng, hilum.cx, hilum.cy, side)]
    knob_r = uniform(rng, 0.022, 0.028)
    return Anatomy(
        mid=mid, body=body, right=right, left=left, heart=heart,
        knob=Ellipse(mid + 0.9 * left.u_medial, uniform(rng, 0.25, 0.29), knob_r, knob_r),
        spine=Spine(mid, uniform(rng, 0.04, 0.05), uniform(rng, 0.055, 0.065), uniform(rng, 0.0, 1.0),
                    uniform(rng, 0.07, 0.1)),
        bones=(*_ribs(rng, (right, left)), *_clavicles(rng, mid)),
        airways=airways, vessels=tuple(vessels), hila=hila,
        bubble=Ellipse(mid + uniform(rng, 0.14, 0.2), left.base_y - 0.6 * left.dome_height + 0.045,
                       uniform(rng, 0.035, 0.05), uniform(rng, 0.02, 0.03), density=-0.12),
        lung_darkening=uniform(rng, 0.38, 0.44), heart_density=uniform(rng, 0.03, 0.06),
        texture=rng.standard_normal((48, 48)).astype(np.float32),
        background=rng.standard_normal((4, 4)).astype(np.float32),
        gain=uniform(rng, 0.93, 1.07), offset=uniform(rng, -0.025, 0.025),
    )

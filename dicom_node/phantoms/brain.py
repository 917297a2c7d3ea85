"""Synthetic brain MR volumes (FLAIR-like) with an optional tumour-like lesion and its exact masks.

The anatomy is nilearn's bundled MNI152 2009 template (T1, grey and white matter probabilities, brain
mask; loaded from the installed package, nothing is downloaded), resampled onto the phantom's grid.
The contrast is FLAIR-like: white matter 1, grey matter 1.2, cerebrospinal fluid (the brain mask's
remainder) 0.15, mixed by the voxel's tissue probabilities, so fluid is dark and a lesion with oedema
is bright, as on the sequence radiologists read tumours and their oedema on.

A lesion is a core (a sphere deformed by a smoothed random field) inside an oedema halo (a larger
deformed sphere around it), both clipped to the brain mask and painted with hard edges: the masks are
exactly the voxels painted, and the volumes are voxel counts times the voxel volume. Then a smooth
multiplicative bias field, Rician noise (the magnitude of complex Gaussian noise) and a per-volume
intensity scale, and the result is rounded to 12-bit stored values.

Random streams (``np.random.default_rng``, none global): ``[seed, 0]`` draws everything that is
geometry or a per-volume number (lesion presence, size, place, intensities, bias, scale, noise
level), ``[seed, 1]`` the lesion's shape fields (on a 1 mm world grid), ``[seed, 2, grid]`` the
noise. The lesion and bias live in world millimetres, so a seed gives the same patient and lesion at
every spacing and orientation; only the sampling and the noise differ.
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

LESION_PRIOR = 0.75  # chance of a lesion when ``lesion`` is None
VOLUME_RANGE_CM3 = (0.5, 30.0)  # whole lesion (core + oedema) target volume, log-uniform
CONTRAST = {"wm": 1.0, "gm": 1.2, "csf": 0.15}
BITS_STORED = 12
VALUE_PER_UNIT = 1000.0  # stored value of white matter at intensity scale 1
FOV_MM = (180.0, 230.0, 190.0)  # slices (inferior to superior), rows (A to P), columns (R to L)
CENTRE_MNI = (0.0, -17.0, 10.0)  # RAS millimetres the field of view is centred on
OBLIQUE_DEGREES = 12.0  # tilt about the left-right axis (an AC-PC-like angulation)
_LESION_DEPTH_MM = 6.0  # a lesion centre lies at least this deep in the brain


class NilearnMissingError(ImportError):
    """nilearn (the brain template) is not installed."""


@dataclass(frozen=True)
class Templates:
    """MNI152 maps in RAS voxel order (x, y, z) and their voxel-to-RAS-millimetre affine."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class Lesion:
    """A lesion's geometry in world (LPS) millimetres and its intensities."""

    centre: np.ndarray
    radius_mm: float  # of the whole lesion before deformation
    core_fraction: float  # core radius / whole radius
    roughness: float
    core_intensity: float
    oedema_intensity: float


@dataclass(frozen=True, eq=False)
class BrainPhantom:
    """One brain MR phantom volume and its ground truth.

    Attributes
    ----------
    pixels
        uint16 stored values, shape (slices, rows, columns); no rescale (slope 1, intercept 0).
    affine
        4x4 from index (slice, row, column) to the voxel centre in patient millimetres (LPS).
    brain
        bool, the resampled MNI152 brain mask (probability >= 0.5).
    core, lesion
        bool, the lesion's core and the whole lesion (core and oedema); empty without a lesion.
    seed
        The seed it was made from.
    """

    pixels: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    core: np.ndarray
    lesion: np.ndarray
    seed: int

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Millimetres between voxel centres along slice, row and column."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])

    @property
    def voxel_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    @property
    def has_lesion(self) -> bool:
        return bool(self.lesion.any())

    @property
    def lesion_volume_mm3(self) -> float:
        """The truth: whole lesion (core and oedema) voxels times the voxel volume."""
        return float(np.count_nonzero(self.lesion)) * self.voxel_mm3

    @property
    def core_volume_mm3(self) -> float:
        return float(np.count_nonzero(self.core)) * self.voxel_mm3


@lru_cache(maxsize=1)
def load_templates() -> Templates:
    """The MNI152 2009 templates bundled with nilearn at 1 mm (read-only arrays)."""
    try:
        from nilearn import datasets
    except ImportError as exc:
        raise NilearnMissingError(
            "brain phantoms need nilearn (the MNI152 template): pip install '.[phantoms]'") from exc
    t1 = datasets.load_mni152_template(resolution=1)
    images = (t1, datasets.load_mni152_gm_template(resolution=1),
              datasets.load_mni152_wm_template(resolution=1), datasets.load_mni152_brain_mask(resolution=1))
    maps = [np.asarray(img.get_fdata(), dtype=np.float32) for img in images]
    for array in maps:
        array.setflags(write=False)
    return Templates(t1=maps[0], gm=maps[1], wm=maps[2], mask=maps[3],
                     affine=np.asarray(t1.affine, np.float64))


def _rotation_about_x(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]])


def grid_affine(spacing: float, slice_spacing: float, shape: tuple[int, int, int],
                oblique: bool) -> np.ndarray:
    """Index (slice, row, column) to LPS millimetres: axial slices, rows towards P, columns towards L."""
    rotation = _rotation_about_x(OBLIQUE_DEGREES) if oblique else np.eye(3)
    normal, column_dir, row_dir = rotation @ np.array([0.0, 0.0, 1.0]), rotation @ np.array(
        [0.0, 1.0, 0.0]), rotation @ np.array([1.0, 0.0, 0.0])
    affine = np.eye(4)
    affine[:3, 0] = normal * slice_spacing
    affine[:3, 1] = column_dir * spacing
    affine[:3, 2] = row_dir * spacing
    centre_lps = np.array([-CENTRE_MNI[0], -CENTRE_MNI[1], CENTRE_MNI[2]])
    half = (np.array(shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = centre_lps - affine[:3, :3] @ half
    return affine


def _to_template(affine: np.ndarray, templates: Templates) -> np.ndarray:
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return np.asarray(np.linalg.inv(templates.affine) @ lps_to_ras @ affine)


def _resample(array: np.ndarray, index_map: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    out = ndimage.affine_transform(array, index_map[:3, :3], offset=index_map[:3, 3], output_shape=shape,
                                   order=1, mode="constant", cval=0.0, output=np.float32)
    return np.asarray(out)


def _sample_lesion(rng: np.random.Generator, templates: Templates) -> Lesion:
    volume_mm3 = 1000.0 * math.exp(rng.uniform(*np.log(VOLUME_RANGE_CM3)))
    radius = (3.0 * volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)
    # a centre deep enough for most of the lesion to stay in the brain (coarse 3 mm grid suffices)
    coarse = templates.mask[::3, ::3, ::3] >= 0.5
    depth = ndimage.distance_transform_edt(coarse, sampling=3.0)
    wanted = min(radius * 0.8, float(depth.max()) - 3.0)
    candidates = np.argwhere(depth >= max(wanted, _LESION_DEPTH_MM))
    index = candidates[rng.integers(len(candidates))] * 3 + rng.uniform(-1.0, 1.0, 3)
    ras = templates.affine[:3, :3] @ index + templates.affine[:3, 3]
    return Lesion(centre=ras * np.array([-1.0, -1.0, 1.0]), radius_mm=radius,
                  core_fraction=float(rng.uniform(0.35, 0.75)), roughness=float(rng.uniform(0.15, 0.45)),
                  core_intensity=float(rng.uniform(1.35, 2.2)), oedema_intensity=float(rng.uniform(1.4, 1.8)))


def _shape_fields(lesion: Lesion, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Core and oedema level fields (> 0 inside) on a 1 mm LPS box centred on the lesion, and its half
    width."""
    half = math.ceil(lesion.radius_mm * (1.0 + 2.0 * lesion.roughness)) + 2
    n = 2 * half + 1
    rng = np.random.default_rng([seed, 1])
    axis = np.arange(n, dtype=np.float32) - half
    d2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    fields = []
    for radius in (lesion.radius_mm * lesion.core_fraction, lesion.radius_mm):
        noise = ndimage.gaussian_filter(rng.standard_normal((n, n, n)).astype(np.float32), radius / 2.5)
        noise /= max(float(noise.std()), 1e-6)
        fields.append(1.0 - d2 / radius**2 + lesion.roughness * noise)
    return fields[0], fields[1], float(half)


def _paint_lesion(lesion: Lesion, seed: int, affine: np.ndarray, brain: np.ndarray,
                  tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    core_field, oedema_field, half = _shape_fields(lesion, seed)
    shape = brain.shape
    # index box of the phantom grid that can touch the field's box
    corners = np.array([[sx, sy, sz] for sx in (-half, half) for sy in (-half, half) for sz in (-half, half)])
    inverse = np.linalg.inv(affine)
    index = (inverse[:3, :3] @ (lesion.centre + corners).T).T + inverse[:3, 3]
    lo = np.clip(np.floor(index.min(axis=0)).astype(int), 0, shape)
    hi = np.clip(np.ceil(index.max(axis=0)).astype(int) + 1, 0, shape)
    core = np.zeros(shape, dtype=bool)
    whole = np.zeros(shape, dtype=bool)
    if (hi <= lo).any():
        return core, whole
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    # box index -> LPS mm -> field index (the field box's origin is centre - half, 1 mm steps)
    to_field = np.eye(4)
    to_field[:3, 3] = half - lesion.centre
    shift = np.eye(4)
    shift[:3, 3] = lo
    index_map = to_field @ affine @ shift
    size = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    core_box = ndimage.affine_transform(core_field, index_map[:3, :3], offset=index_map[:3, 3],
                                        output_shape=size, order=1, cval=-1.0) > 0
    whole_box = ndimage.affine_transform(oedema_field, index_map[:3, :3], offset=index_map[:3, 3],
                                         output_shape=size, order=1, cval=-1.0) > 0
    core[box] = core_box & brain[box]
    whole[box] = (core_box | whole_box) & brain[box]
    tissue[whole & ~core] = lesion.oedema_intensity
    tissue[core] = lesion.core_intensity
    return core, whole


def _bias(rng: np.random.Generator, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """exp of a random quadratic in world millimetres (about +-15 % over the head), on the grid."""
    quadratic = rng.normal(0.0, 0.06, (3, 3))
    quadratic = (quadratic + quadratic.T) / 2.0
    linear = rng.normal(0.0, 0.08, 3)
    # u = (world - centre) / 100 mm = m @ index + t; log bias = u.Q.u + l.u as a quadratic of the index
    centre = np.array([-CENTRE_MNI[0], -CENTRE_MNI[1], CENTRE_MNI[2]])
    m, t = affine[:3, :3] / 100.0, (affine[:3, 3] - centre) / 100.0
    q = m.T @ quadratic @ m
    lin = 2.0 * t @ quadratic @ m + linear @ m
    const = float(t @ quadratic @ t + linear @ t)
    k, r, c = (np.arange(n, dtype=np.float64) for n in shape)
    part_kr = (q[0, 0] * k**2 + lin[0] * k + const)[:, None] + (q[1, 1] * r**2 + lin[1] * r)[None, :] \
        + 2.0 * q[0, 1] * np.outer(k, r)
    part_c = (q[2, 2] * c**2 + lin[2] * c).astype(np.float32)
    part_kc = (2.0 * q[0, 2] * np.outer(k, c)).astype(np.float32)
    part_rc = (2.0 * q[1, 2] * np.outer(r, c)).astype(np.float32)
    log_bias = part_kr.astype(np.float32)[:, :, None] + part_kc[:, None, :]
    log_bias += part_rc[None, :, :]
    log_bias += part_c[None, None, :]
    return np.exp(log_bias, out=log_bias)


def _check(seed: int, spacing: float, slice_spacing: float | None, slices: int | None) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    for name, value in (("spacing", spacing), ("slice_spacing", slice_spacing)):
        if value is not None and not (isinstance(value, int | float) and 0.5 <= value <= 8.0):
            raise ValueError(f"{name}: expected millimetres from 0.5 to 8, got {value!r}")
    if slices is not None and (isinstance(slices, bool) or not isinstance(slices, int) or slices < 2):
        raise ValueError(f"slices: expected an integer >= 2, got {slices!r}")


def grid_shape(spacing: float, slice_spacing: float, slices: int | None = None) -> tuple[int, int, int]:
    """(slices, rows, columns) covering ``FOV_MM`` (or ``slices`` slices) at the given spacings."""
    count = slices if slices is not None else round(FOV_MM[0] / slice_spacing)
    return int(count), round(FOV_MM[1] / spacing), round(FOV_MM[2] / spacing)


def render_brain(seed: int, *, spacing: float = 1.0, slice_spacing: float | None = None,
                 slices: int | None = None, lesion: bool | None = None,
                 oblique: bool = False) -> BrainPhantom:
    """The brain MR phantom of ``seed`` on an axial (or oblique) grid.

    Parameters
    ----------
    seed
        Non-negative integer; the same arguments give identical arrays.
    spacing
        In-plane pixel spacing in mm (0.5 to 8).
    slice_spacing
        Distance between slice centres in mm; default ``spacing``.
    slices
        Number of slices, centred on the brain; default: ``FOV_MM[0] / slice_spacing`` (180 at 1 mm).
    lesion
        True or False forces a lesion or none; None draws one with probability ``LESION_PRIOR``.
    oblique
        Tilt the slices by ``OBLIQUE_DEGREES`` about the left-right axis.

    Returns
    -------
    BrainPhantom
    """
    _check(seed, spacing, slice_spacing, slices)
    seed, spacing = int(seed), float(spacing)
    slice_step = float(slice_spacing) if slice_spacing is not None else spacing
    shape = grid_shape(spacing, slice_step, slices)
    affine = grid_affine(spacing, slice_step, shape, oblique)
    templates = load_templates()
    index_map = _to_template(affine, templates)
    gm, wm, mask = (_resample(a, index_map, shape) for a in (templates.gm, templates.wm, templates.mask))
    brain = mask >= 0.5
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    tissue = CONTRAST["wm"] * wm + CONTRAST["gm"] * gm + CONTRAST["csf"] * csf
    rng = np.random.default_rng([seed, 0])
    drawn = bool(rng.random() < LESION_PRIOR)  # drawn either way, so that forcing it shifts no stream
    present = drawn if lesion is None else bool(lesion)
    geometry = _sample_lesion(rng, templates)
    core = np.zeros(shape, dtype=bool)
    whole = np.zeros(shape, dtype=bool)
    if present:
        core, whole = _paint_lesion(geometry, seed, affine, brain, tissue)
    tissue *= _bias(rng, affine, shape)
    scale = float(rng.uniform(0.7, 1.4)) * VALUE_PER_UNIT
    sigma = float(rng.uniform(0.015, 0.04))
    grid_key = (*shape, round(spacing * 1000), round(slice_step * 1000), int(oblique))
    noise = np.random.default_rng([seed, 2, *grid_key])
    real = noise.standard_normal(shape, dtype=np.float32)
    real *= sigma
    real += tissue
    imag = noise.standard_normal(shape, dtype=np.float32)
    imag *= sigma
    magnitude = np.hypot(real, imag, out=real)
    magnitude *= scale
    pixels = np.clip(np.rint(magnitude), 0, (1 << BITS_STORED) - 1).astype(np.uint16)
    return BrainPhantom(pixels=pixels, affine=affine, brain=brain, core=core, lesion=whole, seed=seed)

"""A series (or one enhanced multi-frame instance) as a 3D volume with its geometry.

Slices are sorted by Image Position (Patient) projected on the slice normal (row cosines x column
cosines), never by Instance Number; the spacing between slices comes from those positions, never
from Slice Thickness or Spacing Between Slices. A stack that is not one regular block of parallel
slices is refused with a :class:`VolumeError` that names what is wrong and where.

The array is indexed (slice, row, column); :attr:`Volume.affine` maps that index to patient
coordinates in millimetres (LPS, as DICOM). Each slice keeps its source (SOP Instance UID, frame
number), and rows and columns are never flipped, so voxel ``(k, r, c)`` *is* pixel ``(r, c)`` of
the source of slice ``k``. highdicom 0.28 (``get_volume_from_series``, ``Image.get_volume``)
builds the same voxels and geometry (the tests compare), but refuses with "not a regularly-spaced
volume" without naming the instances or the problem and keeps no per-slice source, so the checks
and the sources are done here.
"""

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from scipy import ndimage

from dicom_node.inference.voi import frame_attribute, modality_lut

ORIENTATION_TOL = 1e-3
"""Largest difference between two slices' direction cosines (and from unit length/orthogonality)."""
DRIFT_FLOOR_MM = 0.02  # below DS rounding of positions is not drift
SPACING_RTOL = 0.01
"""Largest deviation of a step between slices from the median step, as a fraction of it."""
DUPLICATE_MM = 0.01
"""Two slices closer than this along the normal are at the same place."""
SHEAR_FRACTION = 0.1
"""Largest in-plane shift of a slice from the stack's axis, as a fraction of the pixel spacing."""


class VolumeError(ValueError):
    """The instances do not form one regular volume; the message says why, for a radiographer."""


@dataclass(frozen=True)
class SliceSource:
    """Where a slice of the volume comes from: an instance and its frame number (1 if single-frame)."""

    sop_instance_uid: str
    frame: int


@dataclass(frozen=True)
class Volume:
    """Voxels (slice, row, column) in float32 after rescale, their affine and their sources.

    Attributes
    ----------
    array : numpy.ndarray
        Shape (slices, rows, columns), Modality LUT (rescale) applied.
    affine : numpy.ndarray
        4x4; ``affine @ (k, r, c, 1)`` is the voxel centre in patient millimetres (LPS).
    sources : tuple of SliceSource
        One per slice, in the array's slice order.
    """

    array: np.ndarray
    affine: np.ndarray
    sources: tuple[SliceSource, ...]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Millimetres between voxel centres along slice, row and column."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])


@dataclass(frozen=True)
class GridMap:
    """One affine between a volume's grid and a model's grid (voxel centres, same field of view).

    ``source_index = scale * model_index + offset`` per axis; the inverse goes back.
    """

    source_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]
    source_affine: np.ndarray

    @property
    def model_affine(self) -> np.ndarray:
        """4x4 from model-grid index to patient millimetres."""
        index = np.diag([*self.scale, 1.0])
        index[:3, 3] = self.offset
        return np.asarray(self.source_affine @ index)


@dataclass(frozen=True)
class _Plane:
    source: SliceSource
    label: str
    dataset: Dataset
    frame_index: int
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]
    frame_of_reference: str | None


def _numbers(value: object, count: int, what: str, label: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise VolumeError(f"{label} has no usable {what} (found {value!r})") from None
    if values.shape != (count,) or not np.isfinite(values).all():
        raise VolumeError(f"{label} has no usable {what} (found {value!r})")
    return values


def _label(ds: Dataset, frame: int, frames: int) -> str:
    number = ds.get("InstanceNumber")
    name = f"instance {number} ({ds.SOPInstanceUID})" if number not in (None, "") else (
        f"instance {ds.SOPInstanceUID}")
    return f"frame {frame} of {name}" if frames > 1 else name


def _planes(ds: Dataset) -> list[_Plane]:
    frames = int(ds.get("NumberOfFrames") or 1)
    planes = []
    for index in range(frames):
        label = _label(ds, index + 1, frames)
        position = frame_attribute(ds, index, "PlanePositionSequence", "ImagePositionPatient")
        orientation = frame_attribute(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = frame_attribute(ds, index, "PixelMeasuresSequence", "PixelSpacing")
        for value, what in ((position, "Image Position (Patient)"),
                            (orientation, "Image Orientation (Patient)"), (spacing, "Pixel Spacing")):
            if value in (None, ""):
                raise VolumeError(f"{label} has no {what}: its place in the volume is unknown")
        pixel_spacing = _numbers(spacing, 2, "Pixel Spacing", label)
        if (pixel_spacing <= 0).any():
            raise VolumeError(f"{label} has Pixel Spacing {list(pixel_spacing)}: a spacing must be > 0 mm")
        planes.append(_Plane(
            source=SliceSource(str(ds.SOPInstanceUID), index + 1), label=label, dataset=ds,
            frame_index=index, position=_numbers(position, 3, "Image Position (Patient)", label),
            orientation=_numbers(orientation, 6, "Image Orientation (Patient)", label),
            pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
            shape=(int(ds.Rows), int(ds.Columns)), frame_of_reference=ds.get("FrameOfReferenceUID")))
    return planes


def _check_alike(planes: Sequence[_Plane]) -> None:
    first = planes[0]
    row, col = first.orientation[:3], first.orientation[3:]
    if (abs(np.linalg.norm(row) - 1) > ORIENTATION_TOL or abs(np.linalg.norm(col) - 1) > ORIENTATION_TOL
            or abs(row @ col) > ORIENTATION_TOL):
        raise VolumeError(f"{first.label} has Image Orientation (Patient) {list(first.orientation)}, "
                          "which is not two perpendicular unit directions")
    for plane in planes[1:]:
        if np.abs(plane.orientation - first.orientation).max() > ORIENTATION_TOL:
            raise VolumeError(
                f"mixed orientations: {plane.label} is oriented {list(plane.orientation)} but "
                f"{first.label} {list(first.orientation)}; the slices are not parallel")
        if plane.shape != first.shape:
            raise VolumeError(f"mixed image sizes: {plane.label} is {plane.shape[0]}x{plane.shape[1]} "
                              f"but {first.label} {first.shape[0]}x{first.shape[1]} (rows x columns)")
        if not np.allclose(plane.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise VolumeError(f"mixed pixel spacings: {plane.label} has {list(plane.pixel_spacing)} mm "
                              f"but {first.label} {list(first.pixel_spacing)} mm")
        if plane.frame_of_reference != first.frame_of_reference:
            raise VolumeError(f"mixed frames of reference: {plane.label} and {first.label} were not "
                              "acquired in the same patient coordinate system")


def _normal(orientation: np.ndarray) -> np.ndarray:
    normal = np.cross(orientation[:3], orientation[3:])
    return np.asarray(normal / np.linalg.norm(normal))


def _check_steps(planes: Sequence[_Plane], depths: np.ndarray) -> float:
    """The median step between sorted slices; refuses duplicates, gaps and uneven steps."""
    steps = np.diff(depths)
    duplicates = np.flatnonzero(steps < DUPLICATE_MM)
    if duplicates.size:
        i = int(duplicates[0])
        raise VolumeError(f"duplicate positions: {planes[i].label} and {planes[i + 1].label} are at the "
                          f"same place ({depths[i]:.3f} mm along the slice normal)")
    step = float(np.median(steps))
    deviation = np.abs(steps - step) / step
    worst = int(np.argmax(deviation))
    if deviation[worst] > SPACING_RTOL:
        where = (f"between {planes[worst].label} and {planes[worst + 1].label} "
                 f"({depths[worst]:.2f} to {depths[worst + 1]:.2f} mm along the normal)")
        ratio = steps[worst] / step
        if ratio > 1.5 and abs(ratio - round(ratio)) <= SPACING_RTOL * round(ratio):
            raise VolumeError(f"gap: about {round(ratio) - 1} slice(s) missing {where}; the step there "
                              f"is {steps[worst]:.3f} mm where the others are {step:.3f} mm")
        raise VolumeError(f"uneven spacing: the step {where} is {steps[worst]:.3f} mm where the median "
                          f"is {step:.3f} mm ({100 * deviation[worst]:.1f}% off, tolerance "
                          f"{100 * SPACING_RTOL:.0f}%)")
    # the step of the affine: first to last, so that small steps each within the tolerance cannot
    # add up; then every slice must lie where the affine puts it
    step = float(depths[-1] - depths[0]) / (len(depths) - 1)
    drift = np.abs(depths - (depths[0] + step * np.arange(len(depths))))
    worst = int(np.argmax(drift))
    limit = max(SPACING_RTOL * step, DRIFT_FLOOR_MM)
    if drift[worst] > limit:
        raise VolumeError(f"uneven spacing: {planes[worst].label} lies {drift[worst]:.3f} mm from where "
                          f"an even step of {step:.3f} mm puts it (tolerance {limit:.3f} mm): the steps "
                          "change along the stack")
    return step


def _check_shear(planes: Sequence[_Plane], normal: np.ndarray) -> None:
    offsets = np.array([p.position - planes[0].position for p in planes])
    in_plane = offsets - np.outer(offsets @ normal, normal)
    shifts = np.linalg.norm(in_plane, axis=1)
    worst = int(np.argmax(shifts))
    limit = SHEAR_FRACTION * min(planes[0].pixel_spacing)
    if shifts[worst] > limit:
        raise VolumeError(
            f"sheared stack: {planes[worst].label} is shifted {shifts[worst]:.3f} mm within its plane "
            f"from the line through {planes[0].label} along the slice normal (tolerance {limit:.3f} mm; "
            "a tilted gantry or a stack that is not one block)")


def _affine(first: _Plane, normal: np.ndarray, step: float) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 0] = normal * step
    affine[:3, 1] = first.orientation[3:] * first.pixel_spacing[0]
    affine[:3, 2] = first.orientation[:3] * first.pixel_spacing[1]
    affine[:3, 3] = first.position
    return affine


def _pixels(planes: Sequence[_Plane]) -> np.ndarray:
    array = np.empty((len(planes), *planes[0].shape), dtype=np.float32)
    # A multi-frame instance is decoded once for all its frames, not once per frame.
    frames: dict[int, np.ndarray] = {}
    for k, plane in enumerate(planes):
        ds = plane.dataset
        if int(ds.get("NumberOfFrames") or 1) == 1:
            raw = ds.pixel_array
        else:
            if id(ds) not in frames:
                frames[id(ds)] = ds.pixel_array
            raw = frames[id(ds)][plane.frame_index]
        array[k] = modality_lut(ds, raw, plane.frame_index)
    return array


def assemble(datasets: Sequence[Dataset]) -> Volume:
    """The volume of single-frame instances of a series, or of enhanced multi-frame instances.

    Parameters
    ----------
    datasets : sequence of pydicom.Dataset
        The instances, in any order; their frames are the slices.

    Returns
    -------
    Volume

    Raises
    ------
    VolumeError
        Fewer than 2 slices; missing or unusable position, orientation or pixel spacing; mixed
        orientations, sizes, pixel spacings or frames of reference; duplicate positions; a gap or
        uneven spacing; slices shifted within their plane (a sheared stack).
    """
    planes = [plane for ds in datasets for plane in _planes(ds)]
    if len(planes) < 2:
        raise VolumeError(f"a volume needs at least 2 slices; the series has {len(planes)}")
    _check_alike(planes)
    normal = _normal(planes[0].orientation)
    depths = np.array([p.position @ normal for p in planes])
    order = np.argsort(depths, kind="stable")
    planes = [planes[i] for i in order]
    step = _check_steps(planes, depths[order])
    _check_shear(planes, normal)
    return Volume(array=_pixels(planes), affine=_affine(planes[0], normal, step),
                  sources=tuple(p.source for p in planes))


def source_of(volume: Volume, index: Sequence[int]) -> tuple[str, int, int, int]:
    """(SOP Instance UID, frame number, row, column) of the source pixel of voxel ``index``."""
    k, r, c = (operator.index(i) for i in index)  # a fractional index is a caller's mistake
    slices, rows, columns = volume.array.shape
    if not (0 <= k < slices and 0 <= r < rows and 0 <= c < columns):
        raise IndexError(f"voxel {tuple(index)} is outside the volume {volume.array.shape}")
    source = volume.sources[k]
    return source.sop_instance_uid, source.frame, r, c


def grid_map(volume: Volume, shape: Sequence[int]) -> GridMap:
    """The map between ``volume``'s grid and a grid of ``shape`` over the same field of view."""
    model = tuple(int(n) for n in shape)
    if len(model) != 3 or min(model) < 1:
        raise ValueError(f"model grid shape {tuple(shape)} is not 3 positive sizes")
    source = volume.array.shape
    scale = tuple(s / m for s, m in zip(source, model, strict=True))
    # Voxel centres: model voxel m covers [m, m+1) of its grid, i.e. [m*scale, (m+1)*scale) here.
    offset = tuple(0.5 * sc - 0.5 for sc in scale)
    return GridMap(source_shape=(source[0], source[1], source[2]), model_shape=(model[0], model[1], model[2]),
                   scale=(scale[0], scale[1], scale[2]), offset=(offset[0], offset[1], offset[2]),
                   source_affine=volume.affine)


def resample(volume: Volume, shape: Sequence[int], *, mask: bool = False) -> tuple[np.ndarray, GridMap]:
    """``volume`` on a model grid of ``shape`` (linear, or nearest if ``mask``), and the map used."""
    mapping = grid_map(volume, shape)
    array = ndimage.affine_transform(volume.array, np.array(mapping.scale), offset=np.array(mapping.offset),
                                     output_shape=mapping.model_shape, order=0 if mask else 1,
                                     mode="nearest")
    return np.asarray(array, dtype=np.float32), mapping


def back_slice(mapping: GridMap, array: np.ndarray, k: int) -> np.ndarray:
    """Slice ``k`` of the source grid of a model-grid map: ``back(mapping, array)[k]`` (linear,
    float32) without mapping the other slices."""
    if tuple(array.shape) != mapping.model_shape:
        raise ValueError(f"array shape {array.shape} is not the model grid {mapping.model_shape}")
    if not 0 <= k < mapping.source_shape[0]:
        raise ValueError(f"slice {k} is outside the source grid's {mapping.source_shape[0]} slices")
    scale = np.array([1.0 / s for s in mapping.scale])
    offset = -np.array(mapping.offset) * scale
    offset[0] += k * scale[0]  # output slice 0 is source slice k
    result = ndimage.affine_transform(array.astype(np.float32), scale, offset=offset,
                                      output_shape=(1, *mapping.source_shape[1:]), order=1, mode="nearest")
    return np.asarray(result[0])


def back(mapping: GridMap, array: np.ndarray, *, mask: bool = False) -> np.ndarray:
    """A model-grid ``array`` on the source grid through the inverse of ``mapping``.

    Nearest neighbour for masks (values kept, dtype kept), linear for maps (float32).
    """
    if tuple(array.shape) != mapping.model_shape:
        raise ValueError(f"array shape {array.shape} is not the model grid {mapping.model_shape}")
    scale = np.array([1.0 / s for s in mapping.scale])
    offset = -np.array(mapping.offset) * scale
    result = ndimage.affine_transform(array if mask else array.astype(np.float32), scale, offset=offset,
                                      output_shape=mapping.source_shape, order=0 if mask else 1,
                                      mode="nearest")
    return np.asarray(result)

"""Segmentation models on a series assembled as a volume, and the lesion's measurements.

The volume (:func:`dicom_node.inference.volume.assemble`) is resampled to the model's grid
(``[input] volume``, linear), normalised (``zscore_nonzero``: MONAI ``NormalizeIntensity`` over
the voxels that are not 0; ``zscore``: over all), run once (a 3D network) or as one batch of its
slices (a 2D network), and each label's sigmoid map is brought back to the source grid LINEARLY
and thresholded there, so that the mask has the source's resolution rather than the model
grid's blocks. Voxel ``(k, r, c)`` of a mask is pixel ``(r, c)`` of ``volume.sources[k]``.
"""

import contextlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import cdist

from dicom_node.inference.manifest import ModelManifest
from dicom_node.inference.registry import LoadedModel
from dicom_node.inference.volume import GridMap, Volume, back, resample


@dataclass(frozen=True)
class VolumeSegmentation:
    """A segmentation model's output for one volume, with its provenance.

    Attributes
    ----------
    model_input : numpy.ndarray
        (slices, rows, columns) on the model grid, normalised: what the model saw.
    probabilities : numpy.ndarray
        (labels, K, R, C) float32 on the source grid, mapped back linearly.
    masks : numpy.ndarray
        (labels, K, R, C) bool: ``probabilities >= threshold`` of each label.
    model_masks : numpy.ndarray
        (labels, slices, rows, columns) bool: the same thresholds on the model grid (the target of
        Seg-Grad-CAM).
    """

    volume: Volume
    mapping: GridMap
    model_input: np.ndarray
    probabilities: np.ndarray
    masks: np.ndarray
    model_masks: np.ndarray
    manifest: ModelManifest

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.label_names

    def found(self) -> list[str]:
        """Labels with at least one voxel in their mask."""
        return [label for label, mask in zip(self.labels, self.masks, strict=True) if mask.any()]

    def mask(self, label: str) -> np.ndarray:
        return np.asarray(self.masks[self.labels.index(label)])

    @cached_property
    def measurements(self) -> dict[str, "LesionMeasurements"]:
        """Each label's :func:`measure`, computed once (the job's record and the SR share it)."""
        return {label: measure(self.mask(label), self.volume.affine) for label in self.labels}

    def summary(self) -> dict[str, object]:
        """What the job's record keeps: per label the voxel count, the total volume, the number of
        lesions, the largest lesion's volume and largest diameter, the highest probability."""
        return {"grid": list(self.volume.array.shape), "model_grid": list(self.mapping.model_shape),
                "labels": {
            label: {"voxels": int(self.mask(label).sum()), **self.measurements[label].as_record(),
                    "max_probability": round(float(self.probabilities[i].max()), 6)}
            for i, label in enumerate(self.labels)}}


def normalise(array: np.ndarray, normalization: str) -> np.ndarray:
    """``array`` z-scored (``zscore_nonzero``: statistics and result over the non-zero voxels only,
    0 stays 0; ``zscore``: over all voxels)."""
    from monai.transforms import NormalizeIntensity  # monai takes seconds to import: not at start-up

    transform = NormalizeIntensity(nonzero=normalization == "zscore_nonzero")
    return np.asarray(transform(array.astype(np.float32)), dtype=np.float32)


def as_batch(array: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """A (slices, rows, columns) grid as the network's input: (1, 1, D, H, W) for a 3D network,
    (D, 1, H, W) (the slices as a batch) for a 2D one."""
    return array[None, None] if spatial_dims == 3 else array[:, None]


def from_batch(output: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """The network's output as (channels, slices, rows, columns), the inverse of :func:`as_batch`."""
    return output[0] if spatial_dims == 3 else output.permute(1, 0, 2, 3)


def segment_volume(loaded: LoadedModel, volume: Volume, bf16: bool = False) -> VolumeSegmentation:
    """Run ``loaded`` (a segmentation model) on ``volume`` and threshold on the source grid."""
    manifest = loaded.manifest
    assert manifest.input.volume is not None and manifest.network is not None
    grid, mapping = resample(volume, manifest.input.volume)
    model_input = normalise(grid, manifest.input.normalization)
    dims = manifest.network.spatial_dims
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and loaded.device.type == "cuda"
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        batch = as_batch(torch.from_numpy(model_input).to(loaded.device), dims)
        logits = from_batch(loaded.module(batch), dims).float()
        model_probabilities = torch.sigmoid(logits).cpu().numpy()
    thresholds = np.array([label.threshold for label in manifest.labels], dtype=np.float32)
    probabilities = np.empty((len(thresholds), *mapping.source_shape), dtype=np.float32)
    for i, model_probability in enumerate(model_probabilities):  # one label at a time, no stacked copy
        probabilities[i] = back(mapping, model_probability)
    return VolumeSegmentation(
        volume=volume, mapping=mapping, model_input=model_input, probabilities=probabilities,
        masks=probabilities >= thresholds[:, None, None, None],
        model_masks=model_probabilities >= thresholds[:, None, None, None], manifest=manifest)


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Cubic millimetres of one voxel: the determinant of the affine's 3x3 part."""
    return float(abs(np.linalg.det(affine[:3, :3])))


def lesion_volume_mm3(mask: np.ndarray, affine: np.ndarray) -> float:
    """Voxels in ``mask`` times the voxel volume."""
    return int(np.count_nonzero(mask)) * voxel_volume_mm3(affine)


#: 26-connectivity: voxels touching by a face, an edge or a corner belong to one lesion.
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
#: Points compared at once when looking for the largest distance (a block of distances is
#: BLOCK x points doubles).
BLOCK = 1024


@dataclass(frozen=True)
class LesionMeasurements:
    """One label's mask measured as a radiologist reads it: the connected lesions (26-connectivity)
    counted, their total volume, and the largest lesion's volume and largest diameter.

    Attributes
    ----------
    total_volume_mm3
        All the label's voxels times the voxel volume (every lesion together).
    lesions
        Connected components of the mask.
    largest_volume_mm3
        The volume of the largest lesion (by voxel count; the first of equals in scan order).
    largest_diameter_mm
        The largest distance between the centres of two voxels of that lesion, in patient
        millimetres (0 for a lesion of one voxel, or none).
    """

    total_volume_mm3: float
    lesions: int
    largest_volume_mm3: float
    largest_diameter_mm: float

    def as_record(self) -> dict[str, float | int]:
        return {"volume_mm3": round(self.total_volume_mm3, 3), "lesions": self.lesions,
                "largest_lesion_volume_mm3": round(self.largest_volume_mm3, 3),
                "largest_lesion_diameter_mm": round(self.largest_diameter_mm, 3)}


def measure(mask: np.ndarray, affine: np.ndarray) -> LesionMeasurements:
    """``mask``'s lesions (connected components, 26-connectivity) and the largest one's size."""
    labelled, count = ndimage.label(mask, structure=CONNECTIVITY)
    if not count:
        return LesionMeasurements(0.0, 0, 0.0, 0.0)
    sizes = np.bincount(labelled.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    box = ndimage.find_objects(labelled, max_label=largest)[largest - 1]
    assert box is not None
    lesion = labelled[box] == largest  # cropped: distances do not depend on where the box is
    return LesionMeasurements(
        total_volume_mm3=lesion_volume_mm3(mask, affine), lesions=count,
        largest_volume_mm3=int(sizes[largest - 1]) * voxel_volume_mm3(affine),
        largest_diameter_mm=largest_diameter_mm(lesion, affine))


def largest_diameter_mm(mask: np.ndarray, affine: np.ndarray) -> float:
    """The largest distance between the centres of two voxels of ``mask``, in patient millimetres
    (0 for one voxel or none); only the affine's 3x3 part matters, so ``mask`` may be a crop. Only
    the surface voxels can be the ends, and of those only the vertices of their convex hull
    (scipy's Qhull, joggled so that flat sets work too); the largest distance among them is found
    in blocks of :data:`BLOCK` points, never as one quadratic matrix."""
    surface = mask & ~ndimage.binary_erosion(mask)
    index = np.argwhere(surface)
    if len(index) < 2:
        return 0.0
    points = index @ affine[:3, :3].T
    if len(points) > 64:
        points = points[ConvexHull(points, qhull_options="QJ").vertices]
    return float(max(cdist(points[i:i + BLOCK], points[i:]).max() for i in range(0, len(points), BLOCK)))


def lesion_slices(mask: np.ndarray, most: int = 3) -> list[int]:
    """Slices to show a lesion on: the one with the largest area, then those halfway between it
    and each end of the lesion (at most ``most``, sorted; none when the mask is empty)."""
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    present = np.flatnonzero(areas)
    if not present.size:
        return []
    largest = int(np.argmax(areas))
    first, last = int(present[0]), int(present[-1])
    picks = [largest, (first + largest) // 2, (largest + last + 1) // 2]
    return sorted(dict.fromkeys(k for k in picks if areas[k]))[:most]

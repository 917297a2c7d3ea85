"""A segmentation mask measured as a radiologist reads it: lesions are the connected pieces
(26-connectivity), the total volume counts every voxel, the volume and largest diameter are the
largest lesion's, and the diameter is between voxel centres in patient millimetres."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from dicom_node.inference.segment import largest_diameter_mm, measure
from dicom_node.inference.volume import GridMap, back, back_slice

SPACING = (3.0, 0.9, 0.8)  # slice, row, column steps in mm
VOXEL = 3.0 * 0.9 * 0.8


def oblique_affine() -> np.ndarray:
    """Index (k, r, c) -> patient mm: rotated 20 and 15 degrees, anisotropic, shifted."""
    a, b = math.radians(20), math.radians(15)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(SPACING)
    affine[:3, 3] = (-10.0, -12.0, 40.0)
    return affine


def brute_force_diameter(mask: np.ndarray, affine: np.ndarray) -> float:
    """Every pair of voxel centres, in patient mm."""
    points = np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]
    return float(pdist(points).max()) if len(points) > 1 else 0.0


def two_blobs() -> np.ndarray:
    """A 4 x 7 x 7 cuboid (196 voxels) and, far from it, a 2 x 3 x 3 one (18 voxels)."""
    mask = np.zeros((12, 30, 30), dtype=bool)
    mask[1:5, 2:9, 2:9] = True
    mask[8:10, 22:25, 22:25] = True
    return mask


def test_two_blobs_are_two_lesions_and_the_diameter_is_the_largest_ones() -> None:
    affine = oblique_affine()
    measured = measure(two_blobs(), affine)
    assert measured.lesions == 2
    assert measured.total_volume_mm3 == pytest.approx(214 * VOXEL, rel=1e-9)
    assert measured.largest_volume_mm3 == pytest.approx(196 * VOXEL, rel=1e-9)
    # corner to corner of the 4 x 7 x 7 cuboid, between voxel centres
    assert measured.largest_diameter_mm == pytest.approx(math.sqrt(9.0**2 + 5.4**2 + 4.8**2), rel=1e-9)
    spanning = largest_diameter_mm(two_blobs(), affine)  # both blobs as one set: far longer
    assert spanning > 2 * measured.largest_diameter_mm


def test_pieces_touching_at_a_corner_are_one_lesion() -> None:
    mask = np.zeros((4, 6, 6), dtype=bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # 26-connected, not 6-connected
    mask[1, 4, 4] = True  # apart
    measured = measure(mask, oblique_affine())
    assert measured.lesions == 2
    assert measured.largest_volume_mm3 == pytest.approx(2 * VOXEL)
    assert measured.largest_diameter_mm == pytest.approx(math.sqrt(3.0**2 + 0.9**2 + 0.8**2))


def test_no_lesion_and_one_voxel() -> None:
    empty = np.zeros((3, 4, 4), dtype=bool)
    assert measure(empty, oblique_affine()).as_record() == {
        "volume_mm3": 0.0, "lesions": 0, "largest_lesion_volume_mm3": 0.0, "largest_lesion_diameter_mm": 0.0}
    empty[1, 2, 2] = True
    assert measure(empty, oblique_affine()).largest_diameter_mm == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_diameter_equals_brute_force_on_an_irregular_lesion(seed: int) -> None:
    """A lumpy blob (hundreds of surface voxels: the hull and the blocks are used) on an oblique,
    anisotropic grid: the same as every pair of voxel centres compared."""
    rng = np.random.default_rng(seed)
    k, r, c = np.mgrid[:14, :40, :40]
    radius = 8 + 3 * np.sin(r / 4.0 + seed) * np.cos(c / 5.0)
    mask = ((k - 7) * 3.0) ** 2 + ((r - 20) * 0.9) ** 2 + ((c - 20) * 0.8) ** 2 < radius**2 * 1.5
    mask &= rng.random(mask.shape) > 0.05  # holes inside do not matter, ragged surface does
    affine = oblique_affine()
    largest = measure(mask, affine)
    assert largest.lesions >= 1
    assert largest_diameter_mm(mask, affine) == pytest.approx(brute_force_diameter(mask, affine), rel=1e-9)


def test_one_source_slice_is_that_slice_of_the_whole_map() -> None:
    mapping = GridMap(source_shape=(9, 20, 18), model_shape=(4, 8, 8), scale=(2.25, 2.5, 2.25),
                      offset=(0.625, 0.75, 0.625), source_affine=oblique_affine())
    array = np.random.default_rng(3).random((4, 8, 8)).astype(np.float32)
    whole = back(mapping, array)
    for k in range(9):
        np.testing.assert_allclose(back_slice(mapping, array, k), whole[k], atol=1e-6)
    with pytest.raises(ValueError, match="slice 9 is outside"):
        back_slice(mapping, array, 9)

"""The hot region of a heatmap on the source image's grid: mask, contour, ellipse.

One definition serves every output, so the SC contour, the SR ellipse, the SEG mask and the GSPS
drawing show the same region: the connected part of ``map >= fraction * max(map)`` (positive
values only) that holds the map's maximum. ``fraction`` is 0.5, the threshold of the IoU quality
figure (dicom_node.explain.quality.iou).
"""

from dataclasses import dataclass

import cv2
import numpy as np

FRACTION = 0.5


@dataclass(frozen=True)
class HotRegion:
    """A heatmap's hot region. Coordinates are (column, row) in DICOM's image convention (PS3.3
    C.18.6.1.2, C.10.5.1.2): (0, 0) is the top left corner of the top left pixel, so a pixel's
    centre is its index + 0.5."""

    mask: np.ndarray  # (rows, columns) bool
    contour: np.ndarray  # (N, 2) float, closed (the first point repeated at the end)
    ellipse: np.ndarray  # (4, 2) float: major axis end points, then minor axis end points
    peak: tuple[float, float]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def hot_region(native_map: np.ndarray, fraction: float = FRACTION) -> HotRegion | None:
    """The hot region of ``native_map`` (rows, columns), or None where the map has no positive value."""
    positive = np.nan_to_num(native_map.astype(np.float32), nan=0.0, copy=False)
    top = float(positive.max())
    if top <= 0:
        return None
    row, column = np.unravel_index(int(np.argmax(positive)), positive.shape)
    _, labels = cv2.connectedComponents((positive >= fraction * top).astype(np.uint8), connectivity=8)
    mask = labels == labels[row, column]
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outline = max(contours, key=len)[:, 0, :].astype(np.float64)
    if len(outline) < 3:  # one pixel or a line: draw the pixel's square
        c, r = outline[0]
        outline = np.array([[c - 0.5, r - 0.5], [c + 0.5, r - 0.5], [c + 0.5, r + 0.5], [c - 0.5, r + 0.5]])
    contour = np.vstack([outline, outline[:1]]) + 0.5
    return HotRegion(mask, contour, _ellipse(mask), (column + 0.5, row + 0.5))


def _ellipse(mask: np.ndarray) -> np.ndarray:
    """The ellipse with the region's centroid and second moments (exact for an elliptic region)."""
    moments = cv2.moments(mask.astype(np.uint8), binaryImage=True)
    area = moments["m00"]
    centre = np.array([moments["m10"] / area, moments["m01"] / area]) + 0.5  # pixel centres
    covariance = np.array([[moments["mu20"], moments["mu11"]], [moments["mu11"], moments["mu02"]]]) / area
    values, vectors = np.linalg.eigh(covariance + np.eye(2) / 12)  # + a pixel's own spread
    semi = 2 * np.sqrt(values)  # a uniform ellipse with semi-axis a has variance a^2 / 4
    minor, major = vectors[:, 0] * semi[0], vectors[:, 1] * semi[1]
    height, width = mask.shape
    # an ellipse reaching past the image is shrunk about its centre (clipping its end points would
    # leave axes that no longer bisect each other: not an ellipse)
    reach = np.abs(np.stack([major, minor]))
    room = np.array([[min(centre[0], width - centre[0]), min(centre[1], height - centre[1])]])
    scale = float(np.min(np.where(reach > 0, room / np.maximum(reach, 1e-9), np.inf), initial=1.0))
    major, minor = major * min(1.0, scale), minor * min(1.0, scale)
    return np.array([centre - major, centre + major, centre - minor, centre + minor])

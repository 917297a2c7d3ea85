"""LIME for images, batched on the model's device, every label in one weighted ridge solve.

Follows lime's image explainer (Ribeiro et al. 2016) so results are comparable: SLIC superpixels at
model resolution, ``samples`` random on/off patterns (the first one all on), switched-off
superpixels replaced by their mean, the model's probabilities for each pattern, weights from the
cosine distance to the all-on pattern with lime's kernel ``sqrt(exp(-d^2 / width^2))`` (width
0.25), and a ridge regression (alpha 1, with intercept) of each label's probability on the
patterns. Differences from lime: masks are built on the device by indexing the superpixel map,
forward passes run in large batches, one solve serves all labels, and the seed is explicit.
"""

from dataclasses import dataclass

import numpy as np
import skimage.segmentation
import skimage.util
import torch
from torch import nn

from dicom_node.explain.quality import blurred

#: What a segmentation may deviate from the requested number of superpixels.
COUNT_TOLERANCE = 0.10


def slic(image: np.ndarray, segments: int = 64, compactness: float = 0.1) -> np.ndarray:
    """SLIC superpixels (Achanta et al. 2012) of a 2-D image in [0, 1] by scikit-image: an (H, W)
    int label map of connected segments numbered from 0, about ``segments`` of them.

    scikit-image seeds its k-means on a regular grid whose count jumps between squares (121, 144
    for 128 requested on a square image), and merging small pieces into connected segments lowers
    it further on busy images. So the request passed on is the one whose grid is nearest
    ``segments``, and when the result misses it by more than :data:`COUNT_TOLERANCE`, the
    segmentation is repeated with twice the ``compactness`` (more regular segments, closer to the
    grid) up to five times, keeping the closest. The count is within the tolerance whenever a
    seed grid is (a square image's grids hold square numbers: 121 for 128, but 25 or 36 for 32,
    where 36 comes back). ``compactness`` weighs space against intensity:
    0.1 lets segments follow edges of a tenth of the intensity range as much as a grid step.
    """
    if image.ndim != 2 or segments < 1:
        raise ValueError(f"slic needs a 2-D image and segments >= 1, not shape {image.shape}, {segments}")
    request = _grid_request(image.shape, segments)
    best: np.ndarray | None = None
    for attempt in range(6):
        labels = skimage.segmentation.slic(
            image.astype(np.float64), n_segments=request, compactness=compactness * 2**attempt,
            channel_axis=None, enforce_connectivity=True, min_size_factor=0.25, start_label=0,
        )
        count = int(labels.max()) + 1
        if best is None or abs(count - segments) < abs(int(best.max()) + 1 - segments):
            best = labels
        if abs(count - segments) <= COUNT_TOLERANCE * segments:
            break
    assert best is not None
    return best


def _grid_request(shape: tuple[int, ...], segments: int) -> int:
    """The ``n_segments`` whose scikit-image seed grid on ``shape`` holds nearest ``segments`` seeds."""

    def seeds(request: int) -> int:
        grid = skimage.util.regular_grid(shape, request)
        return int(np.prod([len(range(*s.indices(n))) for s, n in zip(grid, shape, strict=True)]))

    return min(range(max(1, segments // 2), 2 * segments + 1), key=lambda r: (abs(seeds(r) - segments), r))


@dataclass(frozen=True)
class LimeResult:
    """Per label, one coefficient per superpixel, and what produced it."""

    segments: np.ndarray  # (H, W) superpixel label map on the model grid
    coefficients: np.ndarray  # (labels, superpixels)
    intercepts: np.ndarray  # (labels,)
    patterns: np.ndarray  # (samples, superpixels) 0/1, first row all ones
    probabilities: np.ndarray  # (samples, labels)
    weights: np.ndarray  # (samples,)

    def maps(self) -> np.ndarray:
        """(labels, H, W): each pixel carries its superpixel's coefficient."""
        return self.coefficients[:, self.segments]


def kernel_weights(patterns: np.ndarray, width: float = 0.25) -> np.ndarray:
    """lime's weights: cosine distance of each pattern to the all-on one, through its kernel."""
    ones = np.ones(patterns.shape[1])
    norms = np.linalg.norm(patterns, axis=1) * np.linalg.norm(ones)
    cosine = 1.0 - (patterns @ ones) / np.where(norms > 0, norms, 1.0)
    return np.sqrt(np.exp(-(cosine**2) / width**2))


def weighted_ridge(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise sum_i w_i (y_i - x_i b - c)^2 + alpha |b|^2 for every column of ``y`` in one solve
    (what scikit-learn's ``Ridge(alpha, fit_intercept=True)`` with ``sample_weight`` does)."""
    x_mean = (w[:, None] * x).sum(0) / w.sum()
    y_mean = (w[:, None] * y).sum(0) / w.sum()
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ (w[:, None] * xc) + alpha * np.eye(x.shape[1])
    coefficients = np.linalg.solve(gram, xc.T @ (w[:, None] * yc)).T  # (labels, features)
    return coefficients, y_mean - coefficients @ x_mean


@torch.no_grad()
def lime(model: nn.Module, image: torch.Tensor, segments: np.ndarray, samples: int = 1000,
         seed: int = 0, batch_size: int | None = None, background: torch.Tensor | None = None) -> LimeResult:
    """LIME of ``image`` (C, H, W) on the model's device for every output of ``model``.

    A hidden superpixel shows ``background`` (C, H, W) there; None: the superpixel's mean, as
    lime does by default.

    ``batch_size`` defaults to 256 on a GPU and 8 on the CPU, where small channels-last batches
    stay in cache and run fastest (measured: 3.7 against 9.4 ms an image for the demo model).
    """
    batch_size = batch_size or (256 if image.device.type == "cuda" else 8)
    rng = np.random.default_rng(seed)
    count = int(segments.max()) + 1
    patterns = rng.integers(0, 2, size=(samples, count)).astype(np.float32)
    patterns[0] = 1.0
    device = image.device
    labels = torch.from_numpy(segments).to(device)
    means = torch.zeros(image.shape[0], count, device=device).index_add_(
        1, labels.flatten(), image.flatten(1)) / torch.bincount(labels.flatten(), minlength=count)
    fudged = means[:, labels] if background is None else background  # what a hidden superpixel shows
    on = torch.from_numpy(patterns).to(device)
    outputs = []
    for start in range(0, samples, batch_size):
        masks = on[start:start + batch_size][:, labels].unsqueeze(1)  # (b, 1, H, W)
        batch = (image * masks + fudged * (1 - masks)).contiguous(memory_format=torch.channels_last)
        outputs.append(torch.sigmoid(model(batch)).float().cpu())
    probabilities = torch.cat(outputs).numpy().astype(np.float64)
    weights = kernel_weights(patterns.astype(np.float64))
    coefficients, intercepts = weighted_ridge(patterns.astype(np.float64), probabilities, weights)
    return LimeResult(segments, coefficients, intercepts, patterns, probabilities, weights)


#: Superpixels per image at model resolution: about 11 x 11 pixels each at 128 px.
SEGMENTS = 128


def explain_lime(model: nn.Module, image: torch.Tensor, samples: int = 1000, seed: int = 0) -> LimeResult:
    """The node's LIME: :data:`SEGMENTS` SLIC superpixels of the channel mean, hidden superpixels
    showing a heavily blurred copy of the image (the "absent" of the deletion figure).

    lime's default shows a hidden superpixel's mean instead; SLIC follows edges, so a superpixel
    often is the finding itself and its mean still shows it. Measured on 10 held-out phantoms per
    finding with the demo model: the map's deletion AUC beat a random map's in 100 % of images for
    every finding with the blurred copy, against 20-70 % with the means (MODEL_CARD.md has the
    full figures).
    """
    segments = slic(image.mean(dim=0).cpu().numpy(), segments=SEGMENTS)
    return lime(model, image, segments, samples=samples, seed=seed, background=blurred(image))

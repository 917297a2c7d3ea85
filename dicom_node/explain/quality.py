"""How far an explanation can be trusted: figures computed in batched passes.

Faithfulness: deletion and insertion AUC (Petsiuk et al. 2018) over ``steps`` steps, for the
method's map and, in the same batch, a random map and an edge (Sobel) map as baselines. Robustness:
stability, the mean Pearson correlation of the map with the maps of a few slightly perturbed
inputs. Agreement: Spearman rank correlation of two methods' maps. Focus: sparseness (Gini index).
Against ground truth (phantoms): the pointing game (CheXlocalize's hit) and IoU of the
thresholded map. All maps here are on the model-input grid unless said otherwise.
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sobel_map(image: torch.Tensor) -> torch.Tensor:
    """Edge magnitude of the channel mean of ``image`` (C, H, W): a map that knows no model."""
    gray = image.mean(dim=0, keepdim=True)[None]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=image.device)
    kernels = torch.stack([kx, kx.T])[:, None]
    edges = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return edges.pow(2).sum(dim=1)[0].sqrt()


def random_map(height: int, width: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A seeded uniform random map."""
    return torch.rand(height, width, generator=torch.Generator().manual_seed(seed)).to(device)


def blurred(image: torch.Tensor, kernel: int = 0) -> torch.Tensor:
    """A heavily blurred copy (box blur of about a tenth of the side): the 'nothing here' baseline."""
    kernel = kernel or max(3, (min(image.shape[-2:]) // 10) | 1)
    padded = F.pad(image[None], [kernel // 2] * 4, mode="replicate")
    return F.avg_pool2d(padded, kernel, stride=1)[0]


@torch.no_grad()
def deletion_insertion(
    model: nn.Module, image: torch.Tensor, maps: torch.Tensor, label: int, steps: int = 16,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion AUC of each of ``maps`` (M, H, W) for output ``label``.

    Deletion replaces the most important pixels first with a blurred copy (lower is better);
    insertion puts them back into the blurred copy first (higher is better). Probability is the
    sigmoid of the label's logit; the AUC is the trapezoid over ``steps + 1`` equal fractions.
    """
    count, height, width = maps.shape
    pixels = height * width
    ranks = torch.argsort(torch.argsort(-maps.reshape(count, pixels), dim=1), dim=1)
    limits = torch.round(torch.linspace(0, pixels, steps + 1, device=maps.device)).long()
    shown = (ranks[:, None, :] < limits[None, :, None]).reshape(count * (steps + 1), 1, height, width)
    base = blurred(image)
    deleted = torch.where(shown, base, image)
    inserted = torch.where(shown, image, base)
    batch = torch.cat([deleted, inserted]).contiguous(memory_format=torch.channels_last)
    batch_size = batch_size or (256 if image.device.type == "cuda" else 8)
    probabilities = torch.cat([
        torch.sigmoid(model(batch[i:i + batch_size])[:, label]).float()
        for i in range(0, len(batch), batch_size)
    ]).cpu().numpy().reshape(2, count, steps + 1)
    auc = (probabilities[..., 1:] + probabilities[..., :-1]).sum(-1) / (2 * steps)
    return auc[0], auc[1]


def stability(
    explain: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, perturbations: int = 4,
    noise: float = 0.02, seed: int = 0,
) -> float:
    """Mean Pearson correlation between the map of ``image`` and those of ``perturbations`` copies
    with Gaussian noise (std ``noise`` of the image's range). ``explain`` maps (B, C, H, W) to
    (B, H, W) in one batched call."""
    generator = torch.Generator().manual_seed(seed)
    spread = float(image.max() - image.min()) or 1.0
    jitter = torch.randn((perturbations, *image.shape), generator=generator).to(image.device)
    batch = torch.cat([image[None], image[None] + noise * spread * jitter])
    maps = explain(batch).reshape(perturbations + 1, -1).double()
    centred = maps - maps.mean(dim=1, keepdim=True)
    norms = centred.norm(dim=1).clamp(min=1e-12)
    return float(((centred[1:] @ centred[0]) / (norms[1:] * norms[0])).mean())


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two maps of the same grid (e.g. Grad-CAM against LIME)."""
    ra, rb = _ranks(np.ravel(a)), _ranks(np.ravel(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def sparseness(explanation: np.ndarray) -> float:
    """Gini index of the map's positive part: 0 when spread evenly, near 1 when on one pixel."""
    values = np.sort(np.clip(np.ravel(explanation), 0, None))
    total = values.sum()
    if total <= 0:
        return 0.0
    n = len(values)
    return float(1 - 2 * np.sum((n - np.arange(n) - 0.5) * values) / (n * total))


def pointing_game(explanation: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum falls inside the ground-truth mask (same grid)."""
    y, x = np.unravel_index(np.argmax(explanation), explanation.shape)
    return bool(mask[y, x])


def iou(explanation: np.ndarray, mask: np.ndarray, fraction: float = 0.5) -> float:
    """IoU of the map thresholded at ``fraction`` of its maximum with the mask (same grid)."""
    peak = float(np.max(explanation))
    if peak <= 0:
        return 0.0
    region = explanation >= fraction * peak
    union = np.logical_or(region, mask).sum()
    return float(np.logical_and(region, mask).sum() / union) if union else 0.0


def evaluate_explanation_quality(
    explanation: np.ndarray, mask: np.ndarray, perturbed: list[np.ndarray] | None = None
) -> dict[str, float]:
    """The seed article's figures for one map against its ground truth: IoU, hit and, given the
    maps of perturbed inputs, stability (mean Pearson correlation with them)."""
    figures = {"iou": iou(explanation, mask), "hit": float(pointing_game(explanation, mask)),
               "sparseness": sparseness(explanation)}
    if perturbed:
        flat = np.ravel(explanation)
        figures["stability"] = float(np.mean([np.corrcoef(flat, np.ravel(p))[0, 1] for p in perturbed]))
    return figures

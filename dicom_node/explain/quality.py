"""How far an explanation can be trusted: figures computed in batched passes, each with baselines.

Faithfulness: deletion and insertion AUC (Petsiuk et al. 2018) over ``steps`` steps, for the
method's map and, in the same batch, four baselines that a figure must beat: a random map, an edge
(Sobel) map, a centre map (a centred Gaussian) and the same method on the model with its weights
randomised. Each figure is reported with its margin over each baseline, and :func:`verdict` turns
the margins (and the model version's sanity check, :mod:`dicom_node.explain.sanity`) into one
word. Robustness: stability, the mean Pearson correlation of the map with the maps of a few
slightly perturbed inputs, reported beside the edge map's stability under the same noise (a map
that knows no model is very stable too). Agreement: Spearman rank correlation of two methods'
maps. Focus: sparseness (Gini index) of the map as displayed (min-max normalised, so a signed
map's negative half is not counted as focus). LIME: the weighted R² of its surrogate. Against
ground truth (phantoms): the pointing game and IoU, each with a centre-map and an area baseline.
All maps here are on the model-input grid unless said otherwise.
"""

import copy
import enum
from collections.abc import Callable, Mapping

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


def centre_map(
    height: int, width: int, sigma: float = 0.25, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A centred Gaussian of standard deviation ``sigma`` of each side: a map that only knows where
    radiographs usually put their subject."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height - 0.5
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width - 0.5
    return torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2)).to(device)


def randomised_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every layer's parameters re-initialised (seeded): the model-parameter
    randomisation baseline. Layers without ``reset_parameters`` keep their parameters, so a model
    with none (a TorchScript file) comes back unchanged and its maps will not beat this baseline."""
    clone = copy.deepcopy(model)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    finally:
        torch.random.set_rng_state(state)
    return clone


def blurred(image: torch.Tensor, kernel: int = 0) -> torch.Tensor:
    """A heavily blurred copy (box blur of about a tenth of the side) of ``image`` (C, H, W) or a
    batch (B, C, H, W): the 'nothing here' baseline."""
    kernel = kernel or max(3, (min(image.shape[-2:]) // 10) | 1)
    batch = image if image.dim() == 4 else image[None]
    padded = F.pad(batch, [kernel // 2] * 4, mode="replicate")
    out = F.avg_pool2d(padded, kernel, stride=1)
    return out if image.dim() == 4 else out[0]


def _ranks_with_ties_shuffled(maps: torch.Tensor, seed: int) -> torch.Tensor:
    """Each pixel's rank (0 = most important) in each row of ``maps`` (M, P); pixels of equal value
    (a CAM's zeros after its ReLU) come in a seeded random order, not the raster order, which would
    blur the image from the top down and make a straight edge the model may react to."""
    shuffle = torch.randperm(maps.shape[1], generator=torch.Generator().manual_seed(seed)).to(maps.device)
    order = shuffle[torch.sort(-maps[:, shuffle], dim=1, stable=True).indices]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(maps.shape[1], device=maps.device).expand_as(order))
    return ranks


@torch.no_grad()
def deletion_insertion(
    model: nn.Module, image: torch.Tensor, maps: torch.Tensor, label: int, steps: int = 16,
    batch_size: int | None = None, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion AUC of each of ``maps`` (M, H, W) for output ``label``.

    Deletion replaces the most important pixels first with a blurred copy (lower is better);
    insertion puts them back into the blurred copy first (higher is better). Probability is the
    sigmoid of the label's logit; the AUC is the trapezoid over ``steps + 1`` equal fractions.
    """
    count, height, width = maps.shape
    pixels = height * width
    ranks = _ranks_with_ties_shuffled(maps.reshape(count, pixels), seed)
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


def displayed(explanation: np.ndarray) -> np.ndarray:
    """The map as a viewer shows its intensity: min-max normalised to [0, 1] (all zeros if flat)."""
    values = np.asarray(explanation, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def sparseness(explanation: np.ndarray) -> float:
    """Gini index of the map as displayed: 0 when spread evenly, near 1 when on one pixel.

    Computed on :func:`displayed`, not on the positive part of the signed map: clipping signed
    noise at zero leaves half its pixels empty, which alone scored 0.71.
    """
    values = np.sort(np.ravel(displayed(explanation)))
    total = values.sum()
    if total <= 0:
        return 0.0
    n = len(values)
    return float(1 - 2 * np.sum((n - np.arange(n) - 0.5) * values) / (n * total))


def pointing_game(explanation: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum falls inside the ground-truth mask (same grid, 2D or 3D)."""
    return bool(mask[np.unravel_index(np.argmax(explanation), explanation.shape)])


def centre_grid(shape: tuple[int, ...], sigma: float = 0.25) -> np.ndarray:
    """:func:`centre_map` on a grid of any number of axes (a volume's): a Gaussian centred on the
    grid, of standard deviation ``sigma`` of each side."""
    axes = [((np.arange(n, dtype=np.float32) + 0.5) / n - 0.5) ** 2 for n in shape]
    total = sum(np.reshape(a, [-1 if i == j else 1 for j in range(len(shape))]) for i, a in enumerate(axes))
    return np.asarray(np.exp(-np.asarray(total) / (2 * sigma**2)), dtype=np.float32)


def iou(explanation: np.ndarray, mask: np.ndarray, fraction: float = 0.5) -> float:
    """IoU of the map thresholded at ``fraction`` of its maximum with the mask (same grid)."""
    peak = float(np.max(explanation))
    if peak <= 0:
        return 0.0
    region = explanation >= fraction * peak
    union = np.logical_or(region, mask).sum()
    return float(np.logical_and(region, mask).sum() / union) if union else 0.0


def localisation(explanation: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Pointing game and IoU with their baselines: a centre map's, and the area baseline (the hit
    rate of a uniformly random point, and the IoU of a map that marks the whole image, both the
    mask's share of the image). A large finding is hit by chance; only the margins say more.
    Images (2D) or volumes (3D)."""
    centre = centre_map(*mask.shape).numpy() if mask.ndim == 2 else centre_grid(mask.shape)
    area = float(np.mean(mask))
    return {"hit": float(pointing_game(explanation, mask)), "iou": iou(explanation, mask),
            "hit_centre": float(pointing_game(centre, mask)), "iou_centre": iou(centre, mask),
            "hit_area": area, "iou_area": area}


def evaluate_explanation_quality(
    explanation: np.ndarray, mask: np.ndarray, perturbed: list[np.ndarray] | None = None
) -> dict[str, float]:
    """The figures of one map against its ground truth: localisation with its baselines,
    sparseness and, given the maps of perturbed inputs, stability (mean Pearson correlation)."""
    figures = localisation(explanation, mask) | {"sparseness": sparseness(explanation)}
    if perturbed:
        flat = np.ravel(explanation)
        figures["stability"] = float(np.mean([np.corrcoef(flat, np.ravel(p))[0, 1] for p in perturbed]))
    return figures


def lime_r2(patterns: np.ndarray, probabilities: np.ndarray, weights: np.ndarray,
            coefficients: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """Weighted R² of LIME's linear surrogate, per label (lime's ``score``): how much of the model's
    response to hidden superpixels the map's coefficients explain. Low means the map is a poor
    summary of the model, however tidy it looks."""
    fitted = patterns @ coefficients.T + intercepts  # (samples, labels)
    mean = (weights[:, None] * probabilities).sum(0) / weights.sum()
    residual = (weights[:, None] * (probabilities - fitted) ** 2).sum(0)
    total = (weights[:, None] * (probabilities - mean) ** 2).sum(0)
    return np.where(total > 0, 1 - residual / np.where(total > 0, total, 1.0), 0.0)


#: Baselines of the faithfulness figures, in the order of their rows in the batch.
BASELINES = ("random", "edges", "centre", "randomised_model")
#: A map must beat every baseline's deletion AUC (lower) and insertion AUC (higher) by this much,
#: in probability x fraction-of-pixels units (the AUCs lie in [0, 1]). The issue's real radiograph
#: had Grad-CAM 0.931 against random 0.935: noise-level gaps must not count.
FAITHFULNESS_MARGIN = 0.02


class Verdict(enum.StrEnum):
    """What may be said of one explanation."""

    FAITHFUL = "faithful"
    NOT_SHOWN = "not shown to be faithful"


def baseline_maps(image: torch.Tensor, seed: int) -> torch.Tensor:
    """(3, H, W): the random, edge and centre maps of ``image`` (C, H, W), on its device."""
    height, width = image.shape[-2:]
    return torch.stack([random_map(height, width, seed, image.device), sobel_map(image),
                        centre_map(height, width, device=image.device)])


def faithfulness(
    model: nn.Module, image: torch.Tensor, maps: torch.Tensor, randomised_maps: torch.Tensor,
    label: int, seed: int, steps: int = 16,
) -> list[dict[str, float]]:
    """Deletion and insertion AUC of each of ``maps`` (M, H, W) with every baseline, in one batch.

    ``randomised_maps`` (M, H, W) are the same methods' maps of the model with randomised weights
    (:func:`randomised_copy`), each method's own baseline. Returns, per map, its two AUCs, each
    baseline's and the margins (``deletion_margin_<baseline>``: the baseline's deletion AUC minus
    the map's; ``insertion_margin_<baseline>``: the map's insertion AUC minus the baseline's;
    positive is better).
    """
    count = len(maps)
    stack = torch.cat([maps, baseline_maps(image, seed), randomised_maps])
    deletion, insertion = deletion_insertion(model, image, stack, label, steps=steps, seed=seed)
    figures = []
    for m in range(count):
        rows = dict(zip(BASELINES, (count, count + 1, count + 2, count + 3 + m), strict=True))
        row: dict[str, float] = {"deletion_auc": float(deletion[m]), "insertion_auc": float(insertion[m])}
        for name, r in rows.items():
            row[f"deletion_auc_{name}"] = float(deletion[r])
            row[f"insertion_auc_{name}"] = float(insertion[r])
            row[f"deletion_margin_{name}"] = float(deletion[r] - deletion[m])
            row[f"insertion_margin_{name}"] = float(insertion[m] - insertion[r])
        figures.append(row)
    return figures


def verdict(
    figures: Mapping[str, float], sanity_passed: bool, margin: float = FAITHFULNESS_MARGIN
) -> Verdict:
    """FAITHFUL only if every deletion and insertion margin is at least ``margin`` and the model
    version passed the sanity check; anything else, a missing figure included, is NOT_SHOWN."""
    needed = [f"{kind}_margin_{name}" for kind in ("deletion", "insertion") for name in BASELINES]
    if not sanity_passed or any(key not in figures for key in needed):
        return Verdict.NOT_SHOWN
    return Verdict.FAITHFUL if all(figures[key] >= margin for key in needed) else Verdict.NOT_SHOWN


def _beats(figures: Mapping[str, float], kind: str, margin: float) -> list[str]:
    return [name.replace("_", " ") for name in BASELINES
            if figures.get(f"{kind}_margin_{name}", -1.0) >= margin]


def plain_reading(figures: Mapping[str, float], margin: float = FAITHFULNESS_MARGIN) -> list[str]:
    """One sentence per figure, in plain language, for the dashboard and ``jobs show``."""
    lines = []
    for kind, verb in (("deletion", "deleting the highlighted pixels first lowers the probability faster"),
                       ("insertion", "restoring the highlighted pixels first raises the probability faster")):
        beaten = _beats(figures, kind, margin)
        missed = [name.replace("_", " ") for name in BASELINES if name.replace("_", " ") not in beaten]
        if f"{kind}_auc" not in figures:
            continue
        lines.append(f"{verb} than for {', '.join(beaten) or 'none of the'} maps"
                     + (f"; not clearly faster than for {', '.join(missed)} maps" if missed else ""))
    if "stability" in figures and "stability_edges" in figures:
        lines.append(f"under slight noise the map keeps a correlation of {figures['stability']:.2f} "
                     f"with itself (an edge map, which knows no model, keeps "
                     f"{figures['stability_edges']:.2f})")
    if "sparseness" in figures:
        lines.append(f"the displayed map's focus (Gini index) is {figures['sparseness']:.2f} "
                     "(0: spread evenly, 1: on one pixel)")
    if "lime_r2" in figures:
        lines.append(f"LIME's linear surrogate explains {100 * max(figures['lime_r2'], 0.0):.0f}% of the "
                     "model's response to hidden superpixels (weighted R²)")
    return lines

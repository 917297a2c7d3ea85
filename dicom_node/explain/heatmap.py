"""Heatmaps with their provenance and quality figures: what the explain step hands to encoding."""

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dicom_node.errors import PermanentError
from dicom_node.explain.cam import METHODS
from dicom_node.explain.lime import explain_lime
from dicom_node.explain.quality import (
    deletion_insertion,
    random_map,
    rank_agreement,
    sobel_map,
    sparseness,
    stability,
)
from dicom_node.inference import LoadedModel, Prediction, Preprocessed


@dataclass(frozen=True)
class Heatmap:
    """One explanation of one label on one frame, with everything needed to say where it came from."""

    sop_instance_uid: str
    frame: int
    label: str
    probability: float
    method: str
    layer: str  # the CAM layer, or "superpixels" for LIME
    model: str
    model_version: str
    weights_sha256: str
    model_map: np.ndarray  # (size, size) signed, raw, on the model-input grid
    native_map: np.ndarray  # (rows, columns) the same on the source image's grid
    quality: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # extra overlay banner lines (the input-distribution gate's warning)


def labels_to_explain(prediction: Prediction, which: str) -> list[str]:
    """``positive``: labels at or above threshold; ``all``; ``top-N``: the N most probable."""
    if which == "all":
        return list(prediction.probabilities)
    if which.startswith("top-"):
        ranked = sorted(prediction.probabilities, key=prediction.probabilities.__getitem__, reverse=True)
        return ranked[:int(which[4:])]
    return prediction.positives


def study_seed(uid: str) -> int:
    """A fixed seed per study, so LIME's samples repeat for the same input."""
    return int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16)


def explain_frame(
    loaded: LoadedModel, item: Preprocessed, prediction: Prediction, labels: Sequence[str],
    methods: Sequence[str], seed: int, quality_steps: int = 16, lime_samples: int = 1000,
    timings: dict[str, float] | None = None,
) -> list[Heatmap]:
    """Every method's map of every label for one frame, with its quality figures; the seconds each
    method and the quality figures took are added to ``timings`` (``explain.<method>``,
    ``quality``) when given."""
    spent = timings if timings is not None else {}
    manifest, module = loaded.manifest, loaded.module
    index = [manifest.label_names.index(label) for label in labels]
    x = torch.from_numpy(item.array).to(loaded.device)
    maps: dict[str, torch.Tensor] = {}
    for method in methods:
        started = time.perf_counter()
        if method == "lime":
            result = explain_lime(module, x, samples=lime_samples, seed=seed)
            maps[method] = torch.from_numpy(result.maps()[index]).float().to(loaded.device)
        else:
            try:
                maps[method] = METHODS[method](manifest.cam_layer)(module, x[None], index).maps[0]
            except ValueError as exc:  # the method does not fit this model: no retry will change that
                raise PermanentError(f"{method}: {exc}") from None
        spent[f"explain.{method}"] = spent.get(f"explain.{method}", 0.0) + time.perf_counter() - started
    size = item.array.shape[-1]
    heatmaps = []
    started = time.perf_counter()
    for k, label in enumerate(labels):
        baselines = [random_map(size, size, seed + k, loaded.device), sobel_map(x)]
        stack = torch.stack([m[k] for m in maps.values()] + baselines)  # one batched pass per label
        deletion, insertion = deletion_insertion(module, x, stack, index[k], steps=quality_steps)
        for j, (method, method_maps) in enumerate(maps.items()):
            model_map = method_maps[k].cpu().numpy()
            quality = _quality(loaded, x, method_maps[k], index[k], method, deletion, insertion, j)
            if "gradcam" in maps and method == "lime":
                gradcam = maps["gradcam"][k].cpu().numpy()
                quality["rank_agreement_gradcam"] = rank_agreement(gradcam, model_map)
            heatmaps.append(Heatmap(
                item.sop_instance_uid, item.frame, label, prediction.probabilities[label], method,
                "superpixels" if method == "lime" else manifest.cam_layer, manifest.name,
                manifest.version, manifest.sha256, model_map, item.map.warp_to_source(model_map), quality,
            ))
    spent["quality"] = spent.get("quality", 0.0) + time.perf_counter() - started
    return heatmaps


def _quality(loaded: LoadedModel, x: torch.Tensor, explanation: torch.Tensor, label: int, method: str,
             deletion: np.ndarray, insertion: np.ndarray, row: int) -> dict[str, float]:
    """Figures of one map: its row of the label's deletion/insertion pass (whose last two rows are
    the random and edge baselines), sparseness, and stability for the CAM family."""
    figures = {
        "deletion_auc": float(deletion[row]), "insertion_auc": float(insertion[row]),
        "deletion_auc_random": float(deletion[-2]), "insertion_auc_random": float(insertion[-2]),
        "deletion_auc_edges": float(deletion[-1]), "insertion_auc_edges": float(insertion[-1]),
        "sparseness": sparseness(explanation.cpu().numpy()),
    }
    if method in METHODS:
        cam = METHODS[method](loaded.manifest.cam_layer)
        figures["stability"] = stability(lambda batch: cam(loaded.module, batch, [label]).maps[:, 0], x)
    return figures

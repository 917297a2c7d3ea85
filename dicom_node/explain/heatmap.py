"""Heatmaps with their provenance and quality figures: what the explain step hands to encoding."""

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dicom_node.errors import PermanentError
from dicom_node.explain.cam import METHODS
from dicom_node.explain.lime import LimeResult, explain_lime
from dicom_node.explain.quality import (
    Verdict,
    faithfulness,
    lime_r2,
    randomised_copy,
    rank_agreement,
    sobel_map,
    sparseness,
    stability,
    verdict,
)
from dicom_node.explain.sanity import METHOD as SANITY_CHECKED_METHOD
from dicom_node.inference import LoadedModel, Prediction, Preprocessed

#: The seed of the randomised-weights baseline model: fixed, so its maps repeat for a model version.
RANDOMISED_SEED = 0


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
    verdict: str = Verdict.NOT_SHOWN.value  # quality.Verdict: "faithful" or "not shown to be faithful"
    scale_max: float | None = None  # the colour scale's top: a fixed one (attention: 1), or the map's maximum

    @property
    def banner_line(self) -> str:
        """The verdict as the overlay banner prints it."""
        return f"Explanation {self.verdict} (dicom-node quality figures)"


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


def _method_maps(
    loaded: LoadedModel, module: torch.nn.Module, x: torch.Tensor, index: list[int], methods: Sequence[str],
    seed: int, lime_samples: int, spent: dict[str, float] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, LimeResult]]:
    """Each method's (labels, H, W) maps of ``x`` on ``module`` (the model or its randomised copy)."""
    maps: dict[str, torch.Tensor] = {}
    limes: dict[str, LimeResult] = {}
    for method in methods:
        started = time.perf_counter()
        if method == "lime":
            limes[method] = explain_lime(module, x, samples=lime_samples, seed=seed)
            maps[method] = torch.from_numpy(limes[method].maps()[index]).float().to(loaded.device)
        else:
            try:
                maps[method] = METHODS[method](loaded.manifest.cam_layer)(module, x[None], index).maps[0]
            except ValueError as exc:  # the method does not fit this model: no retry will change that
                raise PermanentError(f"{method}: {exc}") from None
        if spent is not None:
            spent[f"explain.{method}"] = spent.get(f"explain.{method}", 0.0) + time.perf_counter() - started
    return maps, limes


def explain_frame(
    loaded: LoadedModel, item: Preprocessed, prediction: Prediction, labels: Sequence[str],
    methods: Sequence[str], seed: int, quality_steps: int = 16, lime_samples: int = 1000,
    timings: dict[str, float] | None = None, randomised: torch.nn.Module | None = None,
    sanity_passed: bool = False,
) -> list[Heatmap]:
    """Every method's map of every label for one frame, with its quality figures and verdict.

    ``randomised`` is the model with re-initialised weights (``InferenceRunner.baselines``, cached
    per model version; made here when not given): each method's map of it is a baseline. Unless the
    model version passed the sanity check (``sanity_passed``), no map is called faithful. The seconds each
    method and the quality figures took are added to ``timings`` (``explain.<method>``,
    ``quality``) when given.
    """
    spent = timings if timings is not None else {}
    index = [loaded.manifest.label_names.index(label) for label in labels]
    x = torch.from_numpy(item.array).to(loaded.device)
    maps, limes = _method_maps(loaded, loaded.module, x, index, methods, seed, lime_samples, spent)
    started = time.perf_counter()
    randomised = randomised if randomised is not None else randomised_copy(loaded.module, RANDOMISED_SEED)
    baseline_maps = _method_maps(loaded, randomised, x, index, methods, seed, lime_samples)[0]
    heatmaps = []
    for k, label in enumerate(labels):
        stack = torch.stack([m[k] for m in maps.values()])  # one batched pass per label, baselines included
        figures = faithfulness(loaded.module, x, stack, torch.stack([m[k] for m in baseline_maps.values()]),
                               index[k], seed + k, steps=quality_steps)
        for j, (method, method_maps) in enumerate(maps.items()):
            model_map = method_maps[k].cpu().numpy()
            quality = figures[j] | _quality(loaded, x, method_maps[k], index[k], method)
            if method in limes:
                fit = limes[method]
                r2 = lime_r2(fit.patterns, fit.probabilities, fit.weights, fit.coefficients, fit.intercepts)
                quality["lime_r2"] = float(r2[index[k]])
                if "gradcam" in maps:
                    gradcam = maps["gradcam"][k].cpu().numpy()
                    quality["rank_agreement_gradcam"] = rank_agreement(gradcam, model_map)
            manifest = loaded.manifest
            heatmaps.append(Heatmap(
                item.sop_instance_uid, item.frame, label, prediction.probabilities[label], method,
                "superpixels" if method == "lime" else manifest.cam_layer, manifest.name, manifest.version,
                manifest.sha256, model_map, item.map.warp_to_source(model_map), quality,
                # only the method the sanity check ran can be shown faithful: the others are unchecked
                verdict=verdict(quality, sanity_passed and method == SANITY_CHECKED_METHOD).value,
            ))
    spent["quality"] = spent.get("quality", 0.0) + time.perf_counter() - started
    return heatmaps


def _quality(loaded: LoadedModel, x: torch.Tensor, explanation: torch.Tensor, label: int,
             method: str) -> dict[str, float]:
    """Sparseness of the map as displayed and, for the CAM family, its stability beside the edge
    map's stability under the same noise (a map that knows no model is stable too)."""
    figures = {"sparseness": sparseness(explanation.cpu().numpy())}
    if method in METHODS:
        cam = METHODS[method](loaded.manifest.cam_layer)
        figures["stability"] = stability(lambda batch: cam(loaded.module, batch, [label]).maps[:, 0], x)
        figures["stability_edges"] = stability(lambda batch: torch.stack([sobel_map(b) for b in batch]), x)
    return figures

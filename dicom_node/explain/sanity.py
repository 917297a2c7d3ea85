"""The model-parameter randomisation check per model version (Adebayo et al. 2018, cascading).

The weights are re-initialised layer by layer, from the head down to the first layer, each step
keeping the previous steps' randomisation. After each step every held-out image is explained
again (Grad-CAM at the manifest's CAM layer, the method the node's verdict relies on) and its
map compared with the trained model's map by Spearman rank correlation, of the signed maps and of
their absolute values. A method that explains the model gives maps that fall apart as the weights
go; a map that survives (an edge detector, a prior on where findings lie) explains the image, not
the model.

The model *fails* when, with every layer randomised, the mean correlation of the absolute maps or
of the signed maps is still at least :data:`SURVIVAL_THRESHOLD`. The result is cached next to the
weights as ``sanity-<sha256 of the weights>.json``, so a node never recomputes it at start.
"""

import copy
import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dicom_node.explain.cam import METHODS
from dicom_node.explain.quality import rank_agreement
from dicom_node.inference.manifest import ModelError, ModelManifest
from dicom_node.inference.preprocess import preprocess
from dicom_node.inference.registry import ModelRegistry
from dicom_node.phantoms import LABELS, render, to_dataset

logger = logging.getLogger(__name__)

#: Maps whose mean |Spearman rho| with the trained model's stays at or above this once every layer
#: is randomised survive randomisation: the check fails. Adebayo et al. report values near 0 for
#: methods that depend on the model; an edge map scores 1.
SURVIVAL_THRESHOLD = 0.5
#: The fewest held-out images per label the check accepts.
MIN_IMAGES_PER_LABEL = 40
METHOD = "gradcam"


@dataclass(frozen=True)
class LayerStep:
    """The correlations after randomising ``layer`` and every layer above it (mean, 5%, 95%)."""

    layer: str
    signed: tuple[float, float, float]
    absolute: tuple[float, float, float]


@dataclass(frozen=True)
class SanityResult:
    """The cascade for one model version; ``passed`` is the verdict against the threshold."""

    model: str
    version: str
    weights_sha256: str
    method: str
    images_per_label: int
    threshold: float
    steps: tuple[LayerStep, ...]

    @property
    def passed(self) -> bool:
        last = self.steps[-1]
        return abs(last.signed[0]) < self.threshold and abs(last.absolute[0]) < self.threshold

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"passed": self.passed}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "SanityResult":
        raw = json.loads(text)
        raw.pop("passed", None)
        steps = tuple(LayerStep(s["layer"], tuple(s["signed"]), tuple(s["absolute"]))
                      for s in raw.pop("steps"))
        return cls(**raw, steps=steps)


def randomisable_layers(model: nn.Module) -> list[str]:
    """Names of the layers with parameters that can be re-initialised, from the input to the head."""
    return [name for name, m in model.named_modules()
            if name and callable(getattr(m, "reset_parameters", None))
            and any(True for _ in m.parameters(recurse=False))]


def _spread(values: np.ndarray) -> tuple[float, float, float]:
    return (round(float(values.mean()), 4), round(float(np.percentile(values, 5)), 4),
            round(float(np.percentile(values, 95)), 4))


def cascade(
    model: nn.Module, explain: Callable[[nn.Module, torch.Tensor, Sequence[int]], torch.Tensor],
    images: torch.Tensor, labels: Sequence[int], seed: int = 0,
) -> list[LayerStep]:
    """Cascading randomisation of a copy of ``model``: one :class:`LayerStep` per layer, head first.

    ``explain(model, images, labels)`` returns (N, H, W) maps, image ``i`` explained for label
    ``labels[i]``. The caller's model is not changed.
    """
    reference = explain(model, images, labels).detach().cpu().numpy()
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    generator_state = torch.random.get_rng_state()
    steps = []
    try:
        torch.manual_seed(seed)
        for name in reversed(randomisable_layers(clone)):
            modules[name].reset_parameters()
            maps = explain(clone, images, labels).detach().cpu().numpy()
            signed = np.array([_rho(a, b) for a, b in zip(reference, maps, strict=True)])
            absolute = np.array([_rho(np.abs(a), np.abs(b)) for a, b in zip(reference, maps, strict=True)])
            steps.append(LayerStep(name, _spread(signed), _spread(absolute)))
    finally:
        torch.random.set_rng_state(generator_state)
    return steps


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation; a flat map correlates with nothing (0), not NaN."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return rank_agreement(a, b)


def gradcam_explainer(layer: str) -> Callable[[nn.Module, torch.Tensor, Sequence[int]], torch.Tensor]:
    """Grad-CAM of ``layer``, image ``i`` for label ``labels[i]``, in batches of 32."""
    method = METHODS[METHOD](layer)

    def explain(model: nn.Module, images: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
        wanted = sorted(set(labels))
        maps = []
        for start in range(0, len(images), 32):
            chunk = method(model, images[start:start + 32], wanted).maps
            rows = torch.arange(len(chunk))
            maps.append(chunk[rows, [wanted.index(k) for k in labels[start:start + 32]]])
        return torch.cat(maps)

    return explain


def phantom_images(
    manifest: ModelManifest, per_label: int = MIN_IMAGES_PER_LABEL, first_seed: int = 6_000_000,
) -> tuple[torch.Tensor, list[int]]:
    """Held-out phantoms (seeds from ``first_seed``, never used in training), ``per_label`` with
    each finding present, through DICOM and the node's preprocessing; for a model whose labels are
    not the phantoms' (a bring-your-own model), each label gets the same images. Rendered at twice
    the input side (at least 256 px) so that preprocessing resamples as it does for real images."""
    size = max(256, 2 * manifest.input.size)
    images, labels = [], []
    for k, label in enumerate(manifest.label_names):
        finding = label if label in LABELS else None
        for i in range(per_label):
            phantom = render(first_seed + 1000 * (k if finding else 0) + i, size,
                             findings={finding: True} if finding else None)
            [item] = preprocess(to_dataset(phantom), manifest.input)
            images.append(torch.from_numpy(item.array))
            labels.append(k)
    return torch.stack(images), labels


def cache_path(manifest: ModelManifest) -> Path:
    """Where the result for this model version lives: named with the weights' sha256."""
    return manifest.weights.parent / f"sanity-{manifest.sha256}.json"


def cached_result(manifest: ModelManifest) -> SanityResult | None:
    """The cached result for this model version, or None when there is none (or it is unreadable)."""
    path = cache_path(manifest)
    if not path.is_file():
        return None
    try:
        result = SanityResult.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("sanity cache %s is unreadable", path.name)
        return None
    return result if result.weights_sha256 == manifest.sha256 else None


def check_model(
    manifest: ModelManifest, module: nn.Module, images: Callable[[], tuple[torch.Tensor, list[int]]],
) -> SanityResult:
    """The cached result for this model version, or the cascade run now on ``images()`` (the
    held-out images and, per image, the label to explain) and cached."""
    cached = cached_result(manifest)
    if cached is not None:
        return cached
    path = cache_path(manifest)
    batch, labels = images()
    counts = np.bincount(labels, minlength=len(manifest.labels))
    if counts.min() < MIN_IMAGES_PER_LABEL:
        raise ModelError(f"{manifest.path}: the sanity check needs at least {MIN_IMAGES_PER_LABEL} "
                         f"held-out images per label, got {counts.tolist()}")
    steps = cascade(module, gradcam_explainer(manifest.cam_layer), batch, labels)
    result = SanityResult(manifest.name, manifest.version, manifest.sha256, METHOD, int(counts.min()),
                          SURVIVAL_THRESHOLD, tuple(steps))
    try:
        path.write_text(result.to_json(), encoding="utf-8")
    except OSError as exc:  # a read-only model repository: the check still counts, only uncached
        logger.warning("sanity cache %s not written (%s)", path.name, exc.strerror)
    return result


def refusal(manifest: ModelManifest, result: SanityResult) -> str | None:
    """Why ``models verify`` refuses this version, or None: a failed check refuses unless the
    manifest's ``[sanity] accepted_failure`` records it."""
    if result.passed or manifest.sanity_accepted_failure:
        return None
    last = result.steps[-1]
    return (f"{manifest.path}: model {manifest.name} {manifest.version} fails the sanity check: with every "
            f"layer randomised its {result.method} maps still correlate with the trained model's "
            f"(Spearman rho signed {last.signed[0]:+.2f}, absolute {last.absolute[0]:+.2f}; threshold "
            f"{result.threshold}); record the failure under [sanity] accepted_failure to load it anyway")


def verify_models(registry: ModelRegistry, per_label: int = MIN_IMAGES_PER_LABEL) -> list[str]:
    """The sanity check of every model in ``registry`` (cached, else run on held-out phantoms).

    Returns one line per model for the operator; raises :class:`ModelError` for the first model
    refused (see :func:`refusal`).
    """
    lines = []
    for name in registry.names():
        loaded = registry.load(name)
        manifest = loaded.manifest
        if manifest.task != "classification":
            # the cascade explains 2D frames by Grad-CAM of a label's logit; a segmentation
            # model's localisation figures are in its model card (evaluate.py)
            lines.append(f"sanity {name} {manifest.version}: not run (the randomisation cascade covers "
                         "classification models)")
            continue
        result = check_model(manifest, loaded.module, functools.partial(phantom_images, manifest, per_label))
        reason = refusal(loaded.manifest, result)
        if reason is not None:
            raise ModelError(reason)
        last = result.steps[-1]
        state = "passed" if result.passed else f"FAILED, accepted: {loaded.manifest.sanity_accepted_failure}"
        lines.append(f"sanity {name} {loaded.manifest.version}: {state} (all layers randomised: Spearman rho "
                     f"signed {last.signed[0]:+.2f}, absolute {last.absolute[0]:+.2f}, threshold "
                     f"{result.threshold}; {cache_path(loaded.manifest).name})")
    return lines

"""Prototype explanations ("this looks like that"): for a finding, the prototypes that drove it.

For each label to explain, the ``k`` prototypes of that label with the largest contribution to its
logit (pooled similarity x class-connection weight), each with its similarity map upsampled to the
model's input grid (bilinear, cell centres on the receptive fields' centres) and mapped to the
source image through the frame's letterbox (as :mod:`dicom_node.explain.heatmap` maps its
heatmaps), the location of its maximum on both grids, and the prototype's identity: the training
phantom and patch it was projected onto (``prototypes.json`` next to the weights), whose pixels
:func:`prototype_patch` re-renders from the seed.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.errors import PermanentError
from dicom_node.inference.preprocess import Preprocessed
from dicom_node.inference.protopnet import ProtoPNet
from dicom_node.inference.registry import LoadedModel
from dicom_node.inference.runner import Prediction
from dicom_node.phantoms import render

#: The explanation methods of prototype networks (a pipeline's ``explain``), and the architecture.
PROTOTYPE_METHODS = ("prototypes",)
PROTOTYPE_ARCHITECTURE = "protopnet"
#: The file of the prototypes' identities, next to the model's manifest.
IDENTITIES_FILE = "prototypes.json"
#: How many prototypes explain each finding: the most activated ones, each in its own overlay.
TOP_PROTOTYPES = 3

IDENTITY_KEYS = ("prototype", "label", "seed", "render_size", "cell", "box_model", "box_source",
                 "shows_finding")


@dataclass(frozen=True)
class PrototypeIdentity:
    """The training patch a prototype was pushed onto.

    Boxes are (x0, y0, x1, y1) in pixels, end exclusive: ``box_model`` on the model's input grid,
    ``box_source`` on the phantom rendered at ``render_size``. ``shows_finding`` says whether the
    patch overlaps the label's finding mask (a prototype of a label may stand for a patch that
    does not show the finding itself).
    """

    prototype: int
    label: str
    seed: int
    render_size: int
    cell: tuple[int, int]
    box_model: tuple[int, int, int, int]
    box_source: tuple[int, int, int, int]
    shows_finding: bool


@dataclass(frozen=True)
class PrototypeEvidence:
    """One prototype's part in one label's output on one frame."""

    label: str
    identity: PrototypeIdentity
    similarity: float  # the max-pooled similarity
    weight: float  # the class connection from this prototype to ``label``
    model_map: np.ndarray  # (size, size) similarity on the model-input grid
    native_map: np.ndarray  # (rows, columns) the same on the source image's grid
    peak_model: tuple[int, int]  # (x, y) of the map's maximum, model grid
    peak_source: tuple[float, float]  # (x, y) the same point on the source image, continuous pixels
    region_source: tuple[float, float, float, float]  # (x0, y0, x1, y1) the peak cell's patch on the source

    @property
    def contribution(self) -> float:
        return self.similarity * self.weight


def load_identities(path: Path, model: ProtoPNet, labels: tuple[str, ...]) -> list[PrototypeIdentity]:
    """The prototypes' identities from ``path``, checked against ``model`` and its ``labels``.

    Raises
    ------
    ValueError
        Naming the file, the entry and what does not fit.
    """
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the prototypes' identities: {exc}") from None
    count = int(model.prototypes.shape[0])
    if not isinstance(entries, list) or len(entries) != count:
        raise ValueError(f"{path}: expected a list of {count} prototypes (the model's), "
                         f"found {len(entries) if isinstance(entries, list) else type(entries).__name__}")
    identities = []
    for j, entry in enumerate(entries):
        missing = [key for key in IDENTITY_KEYS if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise ValueError(f"{path}: prototype {j} lacks {missing}")
        own = labels[int(model.prototype_labels[j].argmax())]
        if entry["prototype"] != j or entry["label"] != own:
            raise ValueError(f"{path}: entry {j} is prototype {entry['prototype']} of {entry['label']!r}; "
                             f"expected prototype {j} of {own!r}")
        identities.append(PrototypeIdentity(
            j, own, int(entry["seed"]), int(entry["render_size"]), tuple(entry["cell"]),
            tuple(entry["box_model"]), tuple(entry["box_source"]), bool(entry["shows_finding"])))
    return identities


def prototype_patch(identity: PrototypeIdentity) -> np.ndarray:
    """The prototype's training patch, re-rendered from its phantom seed: float32 in [0, 1]."""
    x0, y0, x1, y1 = identity.box_source
    return render(identity.seed, identity.render_size).image[y0:y1, x0:x1]


def upsampled(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(n, h, w) feature-grid maps to (n, size, size), bilinear with cell centres on the centres of
    the cells' receptive fields (``align_corners=False``: a stride-s grid's cell i sits at s*i + s/2)."""
    return F.interpolate(maps[None], size=(size, size), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def explain_prototypes(model: ProtoPNet, item: Preprocessed, labels: tuple[str, ...], explain: list[str],
                       identities: list[PrototypeIdentity], k: int = 3) -> dict[str, list[PrototypeEvidence]]:
    """The ``k`` most activated prototypes of each label in ``explain`` (by similarity x weight).

    ``labels`` are the model's outputs in order; ``explain`` the labels to explain (the positive
    findings, usually).
    """
    unknown = [label for label in explain if label not in labels]
    if unknown:
        raise ValueError(f"explain: labels {unknown} are not the model's {list(labels)}")
    model.eval()
    x = torch.from_numpy(item.array)[None].to(next(model.parameters()).device)
    out = model.explain(x)
    size = x.shape[-1]
    owners = model.prototype_labels.argmax(dim=1)
    result: dict[str, list[PrototypeEvidence]] = {}
    for label in explain:
        c = labels.index(label)
        own = torch.nonzero(owners == c).flatten()
        scores = out.similarities[0, own] * model.last_layer.weight[c, own]
        chosen = own[torch.argsort(scores, descending=True)[:k]]
        maps = upsampled(out.similarity_maps[0, chosen].float(), size).cpu().numpy()
        result[label] = [_evidence(model, label, identities[int(j)], float(out.similarities[0, j]),
                                   float(model.last_layer.weight[c, j]), m, item)
                         for j, m in zip(chosen.tolist(), maps, strict=True)]
    return result


def _evidence(model: ProtoPNet, label: str, identity: PrototypeIdentity, sim: float, weight: float,
              model_map: np.ndarray, item: Preprocessed) -> PrototypeEvidence:
    y, x = np.unravel_index(int(np.argmax(model_map)), model_map.shape)
    sx, sy = item.map.model_to_source(x + 0.5, y + 0.5)
    stride = model.receptive_field()[1]
    x0, y0, x1, y1 = model.patch_box(int(y) // stride, int(x) // stride, model_map.shape[0])
    (rx0, rx1), (ry0, ry1) = (item.map.model_to_source(np.array([x0, x1]), np.array([y0, y1])))
    region = (float(rx0), float(ry0), float(rx1), float(ry1))
    return PrototypeEvidence(label, identity, sim, weight, model_map, item.map.warp_to_source(model_map),
                             (int(x), int(y)), (float(sx), float(sy)), region)


@dataclass(frozen=True)
class PrototypeExplanation:
    """The top prototypes of one label on one frame, with the provenance an output needs."""

    sop_instance_uid: str
    frame: int
    label: str
    probability: float
    model: str
    model_version: str
    weights_sha256: str
    evidence: tuple[PrototypeEvidence, ...]
    notes: tuple[str, ...] = ()  # extra overlay banner lines (the input-distribution gate's warning)

    def summary(self) -> dict[str, Any]:
        """For the job's record: each prototype's identity, similarity and where it matched."""
        return {"sop_instance_uid": self.sop_instance_uid, "frame": self.frame, "label": self.label,
                "probability": round(self.probability, 6), "prototypes": [
                    {"prototype": e.identity.prototype, "similarity": round(e.similarity, 4),
                     "weight": round(e.weight, 4), "seed": e.identity.seed,
                     "render_size": e.identity.render_size, "box": list(e.identity.box_source),
                     "shows_finding": e.identity.shows_finding,
                     "peak": [round(v, 2) for v in e.peak_source]}
                    for e in self.evidence]}


def model_identities(loaded: LoadedModel) -> list[PrototypeIdentity]:
    """The identities of a prototype network's prototypes (``prototypes.json`` beside its manifest).

    Raises
    ------
    PermanentError
        When the model is no prototype network, or the file is missing or does not fit the model.
    """
    manifest = loaded.manifest
    if not isinstance(loaded.module, ProtoPNet):
        raise PermanentError(f"prototypes: model {manifest.name} is a {manifest.architecture} network, "
                             f"expected a {PROTOTYPE_ARCHITECTURE} network")
    try:
        return load_identities(manifest.path.parent / IDENTITIES_FILE, loaded.module, manifest.label_names)
    except ValueError as exc:
        raise PermanentError(str(exc)) from None


def explain_frame_prototypes(loaded: LoadedModel, item: Preprocessed, prediction: Prediction,
                             labels: list[str], identities: list[PrototypeIdentity],
                             k: int = TOP_PROTOTYPES) -> list[PrototypeExplanation]:
    """The ``k`` most activated prototypes of each of ``labels`` on one frame, with provenance."""
    assert isinstance(loaded.module, ProtoPNet)
    manifest = loaded.manifest
    found = explain_prototypes(loaded.module, item, manifest.label_names, labels, identities, k)
    return [PrototypeExplanation(item.sop_instance_uid, item.frame, label, prediction.probabilities[label],
                                 manifest.name, manifest.version, manifest.sha256, tuple(evidence))
            for label, evidence in found.items()]

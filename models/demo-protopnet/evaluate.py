"""Localisation figures of the demo prototype network on held-out phantoms; writes the manifest and card.

For every held-out phantom (the training script's held-out seeds, from 1,000,000, rendered at
1024 px, through DICOM and the node's preprocessing) and every finding it shows, the top prototype
of that label (largest similarity x class connection) is taken with its similarity map mapped to
the source image (:func:`dicom_node.explain.prototypes.explain_prototypes`), and judged against the
finding's exact mask by :func:`dicom_node.explain.quality.localisation`: pointing game and IoU
(map minus its minimum, thresholded at half its peak), with the centre-map and area baselines.
Also measures, on three held-out phantoms, how much the own label's and the other labels'
prototypes add to each logit (``logit_split``). Writes ``model.toml`` (with the weights' sha256),
adds ``localisation`` and ``logit_split`` to ``metrics.json`` and writes ``MODEL_CARD.md``.

Usage: ``nice -n 10 .venv/bin/python models/demo-protopnet/evaluate.py [--count 500]``;
``--card-only`` keeps the localisation figures in ``metrics.json``, measures the logit split again
(seconds) and rewrites the card.
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from dicom_node.explain.prototypes import PrototypeIdentity, explain_prototypes, load_identities
from dicom_node.explain.quality import localisation
from dicom_node.inference import ModelRegistry
from dicom_node.inference.manifest import InputSpec
from dicom_node.inference.preprocess import Preprocessed, preprocess
from dicom_node.inference.protopnet import ProtoPNet
from dicom_node.inference.registry import sha256_of
from dicom_node.phantoms import LABELS, Phantom, render, to_dataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from card import FOCAL, manifest, model_card  # noqa: E402  (next to this script)


def _demo_script() -> ModuleType:
    """``models/demo-cxr/train.py``, loaded the way ``train.py`` loads it."""
    spec = importlib.util.spec_from_file_location("demo_cxr_train", HERE.parent / "demo-cxr" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HELD_OUT_SEED = _demo_script().HELD_OUT_SEED
SPLIT_SEEDS = (1_000_016, 1_000_005, 1_000_018)  # held out; 1,000,016 is the pipeline test's phantom
KEYS = ("hit", "iou", "hit_centre", "iou_centre", "hit_area", "iou_area")


def held_out(seed: int, size: int = 128) -> tuple[Phantom, Preprocessed]:
    """Held-out phantom ``seed`` the way the training script's held-out set makes it.

    The same draws as demo-cxr's ``example`` (render size, photometric, modality, bits stored),
    repeated here because ``example`` returns only the arrays, and the localisation needs the
    phantom's masks at its own size and the frame's letterbox; a test checks both give the same
    input.
    """
    rng = np.random.default_rng(seed)
    phantom = render(seed, int(rng.choice((1024,))))
    photometric = "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2"
    ds = to_dataset(phantom, modality=str(rng.choice(["CR", "DX"])), photometric=photometric,
                    bits_stored=int(rng.choice([12, 14, 16])))
    [item] = preprocess(ds, InputSpec(size=size))
    return phantom, item


def figures_of(model: ProtoPNet, identities: list[PrototypeIdentity], seeds: range,
               size: int) -> dict[str, dict]:
    """Per label: the mean localisation figures of the top prototype over the findings shown, and
    how often that prototype's own training patch shows no finding."""
    rows: dict[str, list[dict[str, float]]] = {label: [] for label in LABELS}
    for seed in seeds:
        phantom, item = held_out(seed, size)
        present = [label for label in LABELS if phantom.labels[label] and label in phantom.masks]
        for label, [top] in explain_prototypes(model, item, LABELS, present, identities, k=1).items():
            native = top.native_map - top.native_map.min()
            row = localisation(native, phantom.masks[label])
            row["top_shows_finding"] = float(top.identity.shows_finding)
            rows[label].append(row)
    return {label: {"findings": len(r), **{key: round(float(np.mean([x[key] for x in r])), 4) if r else None
                                           for key in (*KEYS, "top_shows_finding")}}
            for label, r in rows.items()}


@torch.inference_mode()
def logit_split(model: ProtoPNet, seeds: tuple[int, ...], size: int) -> dict:
    """For each label's logit on each held-out phantom: the sum of similarity x class connection
    over the label's own prototypes and over the other labels' prototypes, and the bias."""
    weight = model.last_layer.weight.detach()
    own = model.prototype_labels.T.bool()
    bias = model.last_layer.bias
    rows = []
    for seed in seeds:
        phantom, item = held_out(seed, size)
        out = model.explain(torch.from_numpy(item.array)[None])
        parts = out.similarities[0] * weight  # (labels, prototypes)
        for k, label in enumerate(LABELS):
            rows.append({"seed": seed, "label": label, "shown": bool(phantom.labels[label]),
                         "logit": round(float(out.logits[0, k]), 2), "own": round(float(parts[k][own[k]].sum()), 2),
                         "other": round(float(parts[k][~own[k]].sum()), 2),
                         "bias": round(float(bias[k]), 2) if bias is not None else 0.0})
    off = weight[~own]
    return {"seeds": list(seeds), "rows": rows, "other_weight_min": round(float(off.min()), 3),
            "other_weight_max": round(float(off.max()), 3), "other_weight_mean": round(float(off.mean()), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="held-out phantoms")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--card-only", action="store_true",
                        help="keep the localisation figures; measure the logit split and rewrite the card")
    parser.add_argument("--folder", type=Path, default=HERE, help="the model's folder (named demo-protopnet)")
    args = parser.parse_args(argv)
    folder = args.folder
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    metrics = json.loads((folder / "metrics.json").read_text())
    sha256 = sha256_of(folder / "weights.pt")
    if sha256 != metrics["sha256"]:
        raise SystemExit(f"{folder / 'weights.pt'}: sha256 {sha256} is not the one metrics.json records")
    (folder / "model.toml").write_text(manifest(metrics["training"]["size"], sha256, metrics["version"]))
    loaded = ModelRegistry(folder.parent).load(folder.name)
    model = loaded.module
    assert isinstance(model, ProtoPNet)
    identities = load_identities(folder / "prototypes.json", model, LABELS)
    metrics["logit_split"] = logit_split(model, SPLIT_SEEDS, loaded.manifest.input.size)
    if args.card_only:
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (folder / "MODEL_CARD.md").write_text(model_card(metrics, identities))
        print("wrote model.toml, metrics.json (logit split) and MODEL_CARD.md")
        return 0
    metrics["localisation"] = figures_of(model, identities, range(HELD_OUT_SEED, HELD_OUT_SEED + args.count),
                                       loaded.manifest.input.size)
    focal = [metrics["localisation"][label] for label in FOCAL if metrics["localisation"][label]["findings"]]
    findings = sum(row["findings"] for row in focal)
    metrics["localisation_focal"] = {
        "findings": findings,
        "hit": round(sum(row["hit"] * row["findings"] for row in focal) / max(findings, 1), 4)}
    metrics["localisation_held_out"] = args.count
    metrics["localisation_minutes"] = round((time.perf_counter() - started) / 60, 1)
    for label, row in metrics["localisation"].items():
        print(label, row, flush=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (folder / "MODEL_CARD.md").write_text(model_card(metrics, identities))
    print(f"wrote model.toml, metrics.json and MODEL_CARD.md in {metrics['localisation_minutes']} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

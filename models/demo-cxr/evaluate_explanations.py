"""Offline explanation figures of the demo model on held-out phantoms, written into MODEL_CARD.md.

For every finding, ``--count`` held-out phantoms that contain it (seeds from 5,000,000, never used
in training or in the card's held-out set), rendered at 512 px, through DICOM and the node's
preprocessing. For each CAM method: the pointing game (hit rate: the map's maximum on the native
grid inside the finding's mask), IoU of the map thresholded at half its maximum, and how often its
deletion AUC beats a random map's. The model-parameter randomisation check (Adebayo et al. 2018):
Spearman correlation between each method's map from the trained model and from the same
architecture with re-initialised weights; explanations that survive randomisation are not
explaining the model. LIME is measured the same way. Figures go to ``explanations.json`` and the card's "Explanations" section.

Usage: ``.venv/bin/python models/demo-cxr/evaluate_explanations.py [--count 40]``
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dicom_node.explain import METHODS
from dicom_node.explain.lime import SEGMENTS, explain_lime
from dicom_node.explain.quality import deletion_insertion, iou, pointing_game, random_map, rank_agreement
from dicom_node.inference import ModelManifest, ModelRegistry, preprocess
from dicom_node.inference.architectures import BUILDERS
from dicom_node.phantoms import LABELS, render, to_dataset

HERE = Path(__file__).resolve().parent
FIRST_SEED = 5_000_000
START, END = "<!-- explanations: written by evaluate_explanations.py -->", "<!-- end of explanations -->"


def _applies(method: str, module: torch.nn.Module, manifest: ModelManifest) -> bool:
    """Whether ``method`` can explain this model (plain CAM needs a pooling + linear head)."""
    try:
        METHODS[method](manifest.cam_layer)(module, torch.zeros(1, manifest.input.channels, 32, 32), [0])
    except ValueError:
        return False
    return True


def evaluate(count: int) -> dict:
    """Per label and method: hit rate, mean IoU, deletion-beats-random rate, randomisation rho."""
    loaded = ModelRegistry(HERE.parent).load("demo-cxr")
    manifest = loaded.manifest
    torch.manual_seed(1)
    randomised = BUILDERS[manifest.architecture](len(LABELS), manifest.input.channels).eval().to(
        memory_format=torch.channels_last)
    methods = [m for m in METHODS if _applies(m, loaded.module, manifest)] + ["lime"]

    def explain(module: torch.nn.Module, method: str, x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
        if method == "lime":
            return torch.from_numpy(explain_lime(module, x, seed=seed).maps()[k]).float()
        return METHODS[method](manifest.cam_layer)(module, x[None], [k]).maps[0, 0]

    figures: dict = {}
    for k, label in enumerate(LABELS):
        rows: dict[str, dict[str, list[float]]] = {m: {"hit": [], "iou": [], "beats": [], "rho": []}
                                                   for m in methods}
        for i in range(count):
            seed = FIRST_SEED + 100 * k + i
            phantom = render(seed, 512, findings={label: True})
            [item] = preprocess(to_dataset(phantom), manifest.input)
            x = torch.from_numpy(item.array)
            for name in methods:
                model_map = explain(loaded.module, name, x, k, seed)
                native = item.map.warp_to_source(model_map.numpy())
                mask = phantom.masks[label]
                deletion, _ = deletion_insertion(loaded.module, x, torch.stack(
                    [model_map, random_map(*model_map.shape, seed=i)]), k)
                random_model_map = explain(randomised, name, x, k, seed).numpy()
                row = rows[name]
                row["hit"].append(float(pointing_game(native, mask)))
                row["iou"].append(iou(native, mask))
                row["beats"].append(float(deletion[0] < deletion[1]))
                row["rho"].append(rank_agreement(model_map.numpy(), random_model_map))
        figures[label] = {m: {key: round(float(np.mean(v)), 3) for key, v in r.items()} for m, r in rows.items()}
    return figures


def card_section(figures: dict, count: int, minutes: float) -> str:
    rows = "\n".join(
        f"| {label} | {method} | {f['hit']:.2f} | {f['iou']:.2f} | {f['beats']:.2f} | {f['rho']:+.2f} |"
        for label, methods in figures.items() for method, f in methods.items()
    )
    return f"""{START}
## Explanations

Measured by `models/demo-cxr/evaluate_explanations.py` on {count} held-out phantoms per finding
(each containing it; 512 px; seeds from {FIRST_SEED}), {minutes:.1f} minutes on the CPU. Hit: the
map's maximum on the image's own grid falls inside the finding's ground-truth mask (pointing
game). IoU: the map at half its maximum against the mask. Deletion beats random: share of images
whose deletion AUC is below a random map's. Randomisation rho: Spearman correlation with the map
of a re-initialised model (near 0 is good: the map depends on what the model learnt).

| finding | method | hit | IoU | deletion beats random | randomisation rho |
| --- | --- | --- | --- | --- | --- |
{rows}

Effusion and cardiomegaly are global findings (a fluid level, the heart's size): a single maximum
or a half-maximum region says little about them. LIME: {SEGMENTS} SLIC superpixels, hidden ones
showing a blurred copy, 1000 samples, the seed of the phantom.

Against the goals (Grad-CAM hit rate at least 0.9 for nodule and consolidation; every method's
deletion AUC below a random map's in at least 90 % of images) and what was tried:

- Version 1.0.0 (`small_cnn`, 32/64/128 channels, CAM layer a quarter of the input side): Grad-CAM
  hit 0.75 for nodules. A four-block network with the CAM layer at an eighth of the side hit
  0.00 (its cells are larger than the nodules; the map's maximum falls beside them). 2.0.0
  (`compact_cnn`, CAM layer at a quarter of the side, a fifth of the multiply-adds of 1.0.0)
  reaches the table's figures.
- LIME with lime's default (a hidden superpixel shows its own mean) beat the random map in 47 %
  (nodule) to 15 % (cardiomegaly) of images: SLIC superpixels follow edges, so one is often the
  finding itself, and its mean still shows it. Hidden superpixels now show a blurred copy of the
  image, the same "absent" as the deletion figure's (so that figure is not independent of how
  LIME perturbs); with 128 superpixels instead of 64 the consolidation IoU went from 0.23 to 0.52.
- Still short: Grad-CAM++ and HiResCAM on effusion (a fluid level at the lung base, where blurring
  the most important pixels changes little).
{END}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    figures = evaluate(args.count)
    minutes = (time.perf_counter() - started) / 60
    (HERE / "explanations.json").write_text(json.dumps({"count": args.count, "figures": figures}, indent=2) + "\n")
    card = HERE / "MODEL_CARD.md"
    text = card.read_text()
    if START in text:
        text = text[:text.index(START)] + text[text.index(END) + len(END) + 1:]
    marker = "## Reproduce"
    card.write_text(text.replace(marker, card_section(figures, args.count, minutes) + "\n" + marker, 1))
    for label, methods in figures.items():
        for method, f in methods.items():
            print(f"{label:<14}{method:<10} hit {f['hit']:.2f}  IoU {f['iou']:.2f}  "
                  f"deletion beats random {f['beats']:.2f}  randomisation rho {f['rho']:+.2f}")
    print(f"{minutes:.1f} min; wrote explanations.json and MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

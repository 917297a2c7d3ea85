"""Offline explanation figures of the demo model on held-out phantoms, written into MODEL_CARD.md.

For every finding, ``--count`` held-out phantoms that contain it (seeds from 6,000,000, never used
in training, in the card's held-out set or while the training recipe was chosen: that used seeds
from 5,000,000), rendered at 512 px, through DICOM and the node's
preprocessing, explained by the pipeline's own code (``explain_frame``: every figure with its
baselines in one batch, and the verdict). Per label and method: the share of images whose map is
"faithful" (beats the random, edge, centre and randomised-model maps on deletion and insertion by
``FAITHFULNESS_MARGIN``, the model version having passed its sanity check), the mean margins, the
pointing game and IoU with their centre and area baselines, sparseness as displayed, stability
beside the edge map's, and LIME's weighted R² (LIME on the first ``--lime-count`` images only:
1000 samples each). For the focal findings, two control maps judged by the same rule: the
ground-truth mask (the verdict's ceiling) and the Grad-CAM map moved by half the image (must fail).
The sanity check's cascade comes from ``sanity-<sha256>.json``. Figures go to
``explanations.json`` and the card's "Explanations" section.

Usage: ``.venv/bin/python models/demo-cxr/evaluate_explanations.py [--count 40] [--lime-count 10]``
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from dicom_node.explain.cam import METHODS
from dicom_node.explain.heatmap import explain_frame
from dicom_node.explain.quality import (
    BASELINES,
    FAITHFULNESS_MARGIN,
    Verdict,
    blurred,
    faithfulness,
    localisation,
    randomised_copy,
    verdict,
)
from dicom_node.explain.sanity import SanityResult, cached_result
from dicom_node.inference import InferenceRunner, ModelRegistry, preprocess
from dicom_node.inference.preprocess import letterbox
from dicom_node.phantoms import LABELS, render, to_dataset

HERE = Path(__file__).resolve().parent
FIRST_SEED = 6_000_000  # 5,000,000 and up were the development seeds the training recipe was chosen on
FOCAL = ("nodule", "consolidation")
CAM_METHODS = ("gradcam", "gradcampp", "hirescam")
START, END = "<!-- explanations: written by evaluate_explanations.py -->", "<!-- end of explanations -->"


def evaluate_image(runner: InferenceRunner, randomised: torch.nn.Module, passed: bool, label: str, seed: int,
                   methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Every figure of each method's map of ``label`` on one held-out phantom that shows it."""
    loaded = runner.model("demo-cxr")
    phantom = render(seed, 512, findings={label: True})
    [item] = preprocess(to_dataset(phantom), loaded.manifest.input)
    [prediction] = runner.predict("demo-cxr", [item])
    figures = {}
    maps = {}
    for heatmap in explain_frame(loaded, item, prediction, [label], methods, seed, randomised=randomised,
                                 sanity_passed=passed):
        maps[heatmap.method] = heatmap.model_map
        row = dict(heatmap.quality) | localisation(heatmap.native_map, phantom.masks[label])
        row["faithful"] = float(heatmap.verdict == "faithful")
        row["min_margin"] = min(v for k, v in heatmap.quality.items() if "_margin_" in k)
        figures[heatmap.method] = row
    if label in FOCAL and "gradcam" in maps:
        figures["controls"] = controls(loaded.module, randomised, item.array, maps["gradcam"], phantom.masks[label],
                                       loaded.manifest.cam_layer, LABELS.index(label), seed, passed)
    return figures


def controls(module: torch.nn.Module, randomised: torch.nn.Module, array: np.ndarray, gradcam_map: np.ndarray,
             mask: np.ndarray, layer: str, label: int, seed: int, passed: bool) -> dict[str, float]:
    """The verdict, by the same rule and baselines, of two maps whose answer is known: the finding's
    ground-truth mask (the best a localising map can do: the verdict's ceiling) and ``gradcam_map``
    (the model-grid Grad-CAM map ``explain_frame`` made) moved by half the image (a wrong map,
    which must not be called faithful)."""
    x = torch.from_numpy(array)
    cam = torch.from_numpy(gradcam_map)
    truth = torch.from_numpy(letterbox(mask.astype(np.float32)[..., None], x.shape[-1])[0][..., 0])
    maps = torch.stack([blurred(truth[None], 5)[0], torch.roll(cam, (x.shape[-2] // 2, x.shape[-1] // 2), (0, 1))])
    wrong = METHODS["gradcam"](layer)(randomised, x[None], [label]).maps[0][0]
    ceiling, moved = faithfulness(module, x, maps, torch.stack([wrong, wrong]), label, seed)
    return {"mask_faithful": float(verdict(ceiling, passed) == Verdict.FAITHFUL),
            "moved_faithful": float(verdict(moved, passed) == Verdict.FAITHFUL)}


def evaluate(count: int, lime_count: int, methods: tuple[str, ...] = CAM_METHODS,
             first_seed: int = FIRST_SEED) -> tuple[dict, SanityResult | None]:
    """Per label and method, the mean of every figure over the held-out phantoms showing it."""
    runner = InferenceRunner(ModelRegistry(HERE.parent), "cpu")
    sanity = cached_result(runner.model("demo-cxr").manifest)
    passed = sanity is not None and sanity.passed
    randomised = randomised_copy(runner.model("demo-cxr").module, 0)
    figures: dict = {}
    for k, label in enumerate(LABELS):
        rows: dict[str, list[dict[str, float]]] = {}
        for i in range(count):
            chosen = methods + (("lime",) if i < lime_count else ())
            for method, row in evaluate_image(runner, randomised, passed, label, first_seed + 100 * k + i,
                                              chosen).items():
                rows.setdefault(method, []).append(row)
        checks = rows.pop("controls", [])
        figures[label] = {method: {key: round(float(np.mean([r[key] for r in method_rows])), 3)
                                   for key in method_rows[0]}
                          | {"images": len(method_rows), "faithful_per_image": [r["faithful"] for r in method_rows],
                             "not_beaten": _not_beaten(method_rows)}
                          for method, method_rows in rows.items()}
        if checks:
            figures[label]["_controls"] = {key: round(float(np.mean([c[key] for c in checks])), 3)
                                           for key in checks[0]} | {"images": len(checks)}
    return figures, sanity


def _not_beaten(rows: list[dict[str, float]]) -> dict[str, int]:
    """Per figure and baseline, how many images' maps missed the margin over it."""
    return {f"{kind} {name}": sum(r[f"{kind}_margin_{name}"] < FAITHFULNESS_MARGIN for r in rows)
            for kind in ("deletion", "insertion") for name in BASELINES}


def wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a share ``rate`` of ``n`` images."""
    if n == 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _row(label: str, method: str, f: dict) -> str:
    margins = " / ".join(f"{f[f'deletion_margin_{b}']:+.3f}" for b in BASELINES)
    insertion = " / ".join(f"{f[f'insertion_margin_{b}']:+.3f}" for b in BASELINES)
    stability = f"{f['stability']:.2f} ({f['stability_edges']:.2f})" if "stability" in f else "-"
    return (f"| {label} | {method} | {f['images']} | {f['faithful']:.2f} | {margins} | {insertion} | "
            f"{f['hit']:.2f} ({f['hit_centre']:.2f}, {f['hit_area']:.2f}) | "
            f"{f['iou']:.2f} ({f['iou_centre']:.2f}, {f['iou_area']:.2f}) | {f['sparseness']:.2f} | {stability} | "
            f"{f['lime_r2']:.2f} |" if "lime_r2" in f else
            f"| {label} | {method} | {f['images']} | {f['faithful']:.2f} | {margins} | {insertion} | "
            f"{f['hit']:.2f} ({f['hit_centre']:.2f}, {f['hit_area']:.2f}) | "
            f"{f['iou']:.2f} ({f['iou_centre']:.2f}, {f['iou_area']:.2f}) | {f['sparseness']:.2f} | {stability} | - |")


def _sanity_table(sanity: SanityResult | None) -> str:
    if sanity is None:
        return "No sanity check cached for these weights: run `dicom-node models verify`."
    rows = "\n".join(f"| {s.layer} | {s.signed[0]:+.2f} [{s.signed[1]:+.2f}, {s.signed[2]:+.2f}] | "
                     f"{s.absolute[0]:+.2f} [{s.absolute[1]:+.2f}, {s.absolute[2]:+.2f}] |" for s in sanity.steps)
    return (f"Cascading randomisation (Adebayo et al. 2018) of {sanity.method} maps, {sanity.images_per_label} "
            f"held-out phantoms per label, each explained for its finding; Spearman rho with the trained "
            f"model's map, mean [5 %, 95 %], after randomising the named layer and every layer above it "
            f"(head first). Threshold: the mean rho of the last row at or above {sanity.threshold} fails. "
            f"Result: **{'passed' if sanity.passed else 'FAILED'}**.\n\n"
            f"| randomised down to | signed rho | absolute rho |\n| --- | --- | --- |\n{rows}")


def card_section(figures: dict, sanity: SanityResult | None, count: int, lime_count: int, minutes: float,
                 first_seed: int = FIRST_SEED) -> str:
    rows = "\n".join(_row(label, method, f) for label, methods in figures.items()
                     for method, f in methods.items() if not method.startswith("_"))
    return f"""{START}
## Explanations

Measured by `models/demo-cxr/evaluate_explanations.py` on {count} held-out phantoms per finding
(each containing it; 512 px; seeds from {first_seed}; LIME on the first {lime_count}), through the
pipeline's own `explain_frame`, {minutes:.1f} minutes on the CPU (2 threads).

**Faithful**: share of images whose map beats every baseline (random, edge, centre, randomised
model) on deletion and insertion AUC by at least {FAITHFULNESS_MARGIN}, the model version having
passed its sanity check (below). Margins are means over the images, in the order random / edge /
centre / randomised model; positive is better. Hit and IoU are followed by (centre map, area)
baselines: a finding covering much of the image is hit by chance. Sparseness: Gini index of the map
as displayed (min-max normalised). Stability: mean correlation under slight noise (the edge map's
under the same noise). LIME R²: its surrogate's weighted R².

| finding | method | n | faithful | deletion margin | insertion margin | hit (centre, area) | IoU (centre, area) | sparseness | stability (edges) | LIME R² |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

### Sanity check

{_sanity_table(sanity)}

{_against_the_goal(figures)}
{END}
"""


FOCAL_GOAL = 0.9  # issue #13: Grad-CAM "faithful" in at least 90 % of images showing a nodule or a consolidation


def _against_the_goal(figures: dict) -> str:
    lines, met = [], True
    for label in FOCAL:
        f = figures.get(label, {}).get("gradcam")
        if f is None:
            return "### Against the goal (issue #13): not measured (no Grad-CAM row)"
        low, high = wilson(f["faithful"], f["images"])
        met &= f["faithful"] >= FOCAL_GOAL
        control = figures[label].get("_controls", {})
        missed = ", ".join(f"{k} {v}" for k, v in f["not_beaten"].items() if v) or "none"
        lines.append(f"| {label} | {f['images']} | {f['faithful']:.2f} [{low:.2f}, {high:.2f}] | "
                     f"{control.get('mask_faithful', float('nan')):.2f} | "
                     f"{control.get('moved_faithful', float('nan')):.2f} | {missed} |")
    rows = "\n".join(lines)
    return f"""### Against the goal (issue #13): {'met' if met else 'not met'}

The goal: Grad-CAM "faithful" in at least {FOCAL_GOAL:.0%} of the held-out images showing a nodule or a
consolidation. Beside it, two maps whose answer is known, judged by the same rule and baselines on the
same images: the finding's ground-truth mask (what a perfect localiser would show: the verdict's
ceiling for this model) and the Grad-CAM map moved by half the image (a wrong map: it must fail).
Rates with their 95 % Wilson interval; "not beaten" counts the images whose Grad-CAM map missed
the margin over a baseline.

| finding | images | Grad-CAM faithful [95 % CI] | ground-truth mask faithful | Grad-CAM moved faithful | Grad-CAM not beaten (images) |
| --- | --- | --- | --- | --- | --- |
{rows}

{_reading(figures)}"""


def _reading(figures: dict) -> str:
    """What the control rows say of the goal, per focal finding."""
    notes = []
    for label in FOCAL:
        rate = figures[label]["gradcam"]["faithful"]
        ceiling = figures[label].get("_controls", {}).get("mask_faithful")
        if ceiling is None:
            continue
        if ceiling < FOCAL_GOAL:
            notes.append(f"For {label}s the ground-truth mask itself is \"faithful\" in {ceiling:.2f} of the images: "
                         f"the goal is above what a perfect localising map reaches with this model and this "
                         f"rule, and Grad-CAM's {rate:.2f} is measured against that ceiling.")
        else:
            notes.append(f"For {label}s the ground-truth mask is \"faithful\" in {ceiling:.2f} of the images and "
                         f"Grad-CAM in {rate:.2f}.")
    return " ".join(notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--lime-count", type=int, default=10)
    parser.add_argument("--methods", default=",".join(CAM_METHODS), help="CAM methods, comma-separated")
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED,
                        help="seed of the first phantom (the card reports the default)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    figures, sanity = evaluate(args.count, args.lime_count, tuple(args.methods.split(",")), args.first_seed)
    minutes = (time.perf_counter() - started) / 60
    (HERE / "explanations.json").write_text(json.dumps({"count": args.count, "first_seed": args.first_seed, "figures": figures}, indent=2) + "\n")
    card = HERE / "MODEL_CARD.md"
    text = card.read_text()
    if START in text:
        text = text[:text.index(START)] + text[text.index(END) + len(END) + 1:]
    marker = "## Reproduce"
    card.write_text(text.replace(marker, card_section(figures, sanity, args.count, args.lime_count, minutes,
                                                      args.first_seed)
                                 + "\n" + marker, 1))
    for label, methods in figures.items():
        for method, f in methods.items():
            if method.startswith("_"):
                print(f"{label:<14}controls   {f}")
                continue
            print(f"{label:<14}{method:<10} faithful {f['faithful']:.2f}  min margin {f['min_margin']:+.3f}  "
                  f"hit {f['hit']:.2f} (centre {f['hit_centre']:.2f})")
    print(f"{minutes:.1f} min; wrote explanations.json and MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

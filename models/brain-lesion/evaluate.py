"""Evaluate the brain lesion model on held-out phantoms as the pipeline delivers it; write metrics.json.

Each held-out phantom (seeds from ``HELD_OUT_SEED``, never trained on) is written as a DICOM MR
Image series, assembled (:func:`dicom_node.inference.volume.assemble`) and segmented by the
pipeline's own step (:func:`dicom_node.inference.segment.segment_volume`: model grid, the
manifest's normalisation, the network, the probability mapped back to the SOURCE grid and
thresholded there). The mask is compared with the phantom's exact whole-lesion mask: Dice, and
the lesion volume the SR reports (:func:`dicom_node.inference.segment.lesion_volume_mm3`) against
the true volume. Lesion-free phantoms count false-positive voxels.

Localisation (lesion cases): each attention gate's coefficients and Seg-Grad-CAM
(:mod:`dicom_node.explain.volume`), on the source grid, against the true mask: pointing game
and IoU (:func:`dicom_node.explain.quality.localisation`), with the centre-map and area
baselines.

Usage: ``PYTHONPATH=. nice -n 10 .venv/bin/python models/brain-lesion/evaluate.py``
(about 10 minutes on a 2-core VM).
"""

import argparse
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.explain.quality import localisation
from dicom_node.explain.volume import attention_maps, seg_gradcam
from dicom_node.inference.registry import LoadedModel, ModelRegistry
from dicom_node.inference.segment import lesion_volume_mm3, segment_volume
from dicom_node.inference.volume import assemble, back
from dicom_node.phantoms.brain import BrainPhantom, render_brain
from dicom_node.phantoms.mr import mr_series

HERE = Path(__file__).resolve().parent
HELD_OUT_SEED = 1_000_000  # as train.py: training seeds stay below
LESION_FREE_EVERY = 5  # every fifth held-out phantom is rendered without a lesion
MIN_LESION_CM3 = 1.0  # the accuracy target holds from this size on
ONE_MM_SEED = HELD_OUT_SEED + 500  # the 180-slice 1 mm series (the end-to-end test's size)


def held_out(count: int, spacing: float = 2.0) -> Iterable[BrainPhantom]:
    """The held-out phantoms: seeds ``HELD_OUT_SEED`` on, every fifth without a lesion."""
    for i in range(count):
        yield render_brain(HELD_OUT_SEED + i, spacing=spacing, lesion=i % LESION_FREE_EVERY != LESION_FREE_EVERY - 1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0


def evaluate_case(loaded: LoadedModel, phantom: BrainPhantom, explain: bool = True) -> dict[str, Any]:
    """One phantom through DICOM and the pipeline's segmentation step, against its exact mask."""
    volume = assemble(mr_series(phantom))
    started = time.perf_counter()
    result = segment_volume(loaded, volume)
    seconds = time.perf_counter() - started
    mask, truth = result.mask("lesion"), phantom.lesion
    found_mm3 = lesion_volume_mm3(mask, volume.affine)
    case: dict[str, Any] = {
        "seed": phantom.seed, "grid": list(volume.array.shape), "spacing_mm": round(phantom.spacing[0], 3),
        "truth_cm3": round(phantom.lesion_volume_mm3 / 1000, 4), "found_cm3": round(found_mm3 / 1000, 4),
        "segment_seconds": round(seconds, 2)}
    if not phantom.has_lesion:
        case["false_positive_voxels"] = int(mask.sum())
        return case
    case["dice"] = round(dice(mask, truth), 4)
    case["volume_error"] = round(found_mm3 / phantom.lesion_volume_mm3 - 1.0, 4)
    if explain:
        maps = {f"attention {name}": back(result.mapping, gate)
                for name, gate in attention_maps(loaded, result).items()}
        cam = seg_gradcam(loaded, result, "lesion")
        if cam is not None:
            maps["seggradcam"] = back(result.mapping, cam)
        case["localisation"] = {name: {k: round(v, 4) for k, v in localisation(array, truth).items()}
                                for name, array in maps.items()}
    return case


def summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and minimum Dice and the largest volume error on lesions >= 1 cm3, false positives on
    lesion-free volumes, and the mean localisation figures of each map with their baselines."""
    large = [c for c in cases if "dice" in c and float(c["truth_cm3"]) >= MIN_LESION_CM3]
    small = [c for c in cases if "dice" in c and float(c["truth_cm3"]) < MIN_LESION_CM3]
    free = [c for c in cases if "false_positive_voxels" in c]
    dices = [float(c["dice"]) for c in large]
    errors = [abs(float(c["volume_error"])) for c in large]
    out: dict[str, Any] = {
        "lesions_1cm3_or_more": len(large), "dice_median": round(float(np.median(dices)), 4) if dices else None,
        "dice_min": round(min(dices), 4) if dices else None,
        "volume_error_abs_max": round(max(errors), 4) if errors else None,
        "volume_error_abs_median": round(float(np.median(errors)), 4) if errors else None,
        "smaller_lesions": len(small),
        "smaller_dice": [float(c["dice"]) for c in small],
        "lesion_free": len(free),
        "lesion_free_with_false_positives": sum(int(c["false_positive_voxels"]) > 0 for c in free),
        "false_positive_voxels": [int(c["false_positive_voxels"]) for c in free],
    }
    located = [c["localisation"] for c in cases if "localisation" in c]
    out["localisation_mean"] = {
        name: {k: round(float(np.mean([loc[name][k] for loc in located if name in loc])), 4)
               for k in located[0][name]}
        for name in (located[0] if located else {})}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=HERE.parent, help="the model repository")
    parser.add_argument("--name", default="brain-lesion")
    parser.add_argument("--held-out", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-one-mm", action="store_true", help="skip the 180-slice 1 mm series")
    parser.add_argument("--out", type=Path, default=None, help="metrics.json (default: next to the model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    loaded = ModelRegistry(args.models).load(args.name)
    cases = []
    for phantom in held_out(args.held_out):
        case = evaluate_case(loaded, phantom)
        cases.append(case)
        print({k: v for k, v in case.items() if k != "localisation"}, flush=True)
    metrics: dict[str, Any] = {"name": loaded.manifest.name, "version": loaded.manifest.version,
                                  "sha256": loaded.manifest.sha256, "held_out": summary(cases), "cases": cases}
    if not args.no_one_mm:
        phantom = render_brain(ONE_MM_SEED, spacing=1.0, lesion=True)
        one_mm = evaluate_case(loaded, phantom)
        metrics["one_mm_series"] = one_mm
        print({k: v for k, v in one_mm.items() if k != "localisation"}, flush=True)
    metrics["evaluation"] = {
        "seconds": round(time.perf_counter() - started, 1), "threads": args.threads,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()]}
    out = args.out or loaded.manifest.path.parent / "metrics.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics["held_out"], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

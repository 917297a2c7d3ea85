"""The brain pipeline end to end with the shipped model: a held-out brain MR phantom written as a
1 mm series of 180 slices (230 x 190 pixels), the ``brain-lesion`` attention U-Net, attention
and Seg-Grad-CAM maps, SEG + SC + SR. Prints each step's seconds (median of ``--repeats`` runs),
the SEG's Dice against the phantom's exact mask, and the total against the issue's anchor: 60 s
for a 180-slice brain series end to end.

Usage: ``PYTHONPATH=. .venv/bin/python bench/brain.py [--repeats 3] [--device cpu|cuda]``
"""

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from dicom_node.config import Pipeline
from dicom_node.inference import InferenceRunner, ModelRegistry
from dicom_node.phantoms.brain import render_brain
from dicom_node.phantoms.mr import mr_series
from dicom_node.pipeline import default_steps, run
from dicom_node.store import InstanceStore
from tests.conftest import make_settings
from tests.store.test_store import put
from tests.test_pipeline import job_of

ANCHOR_S = 60.0
MODELS = Path(__file__).resolve().parents[1] / "models"
SEED = 1_000_500  # a held-out seed (models/brain-lesion/evaluate.py's 1 mm series)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    phantom = render_brain(SEED, spacing=1.0, lesion=True)
    series = mr_series(phantom)
    print(f"series: {len(series)} slices of {phantom.pixels.shape[1]} x {phantom.pixels.shape[2]}, lesion "
          f"{phantom.lesion_volume_mm3 / 1000:.2f} cm3; load average {os.getloadavg()}", flush=True)
    runner = InferenceRunner(ModelRegistry(MODELS), device=args.device)
    runner.model("brain-lesion")  # loading (and the verification forward pass) is not a job's time
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for repeat in range(args.repeats):
            settings = make_settings(root / f"data{repeat}")
            pipeline = Pipeline(name="brain", model="brain-lesion", explain=("attention", "seggradcam"),
                                outputs=("seg", "sc", "sr"))
            settings = dataclasses.replace(settings, pipelines=(pipeline,))
            store = InstanceStore(settings.node.data_dir, 0)
            records = [put(store, ds) for ds in series]
            job = dataclasses.replace(job_of(records), pipeline="brain", model="brain-lesion")
            timings: dict[str, float] = {}
            started = time.perf_counter()
            ctx = run(job, timings, settings=settings, store=store, steps=default_steps(), runner=runner)
            timings["total"] = time.perf_counter() - started
            store.close()
            runs.append(timings)
            print(f"run {repeat + 1}: {timings['total']:.2f} s, {len(ctx.outputs)} objects", flush=True)
    assert ctx.segmentation is not None  # the last run's mask: no second segmentation
    mask = ctx.segmentation.mask("lesion")
    dice = 2 * np.logical_and(mask, phantom.lesion).sum() / (mask.sum() + phantom.lesion.sum())
    for step in ("collect", "read", "preprocess", "inference", "explain", "encode", "store", "total"):
        print(f"{step:>10}: {statistics.median(r.get(step, 0.0) for r in runs):7.2f} s")
    total = statistics.median(r["total"] for r in runs)
    print(f"Dice {dice:.4f}; load average {os.getloadavg()}")
    print(f"ratio to the {ANCHOR_S:.0f} s anchor: {total / ANCHOR_S:.3f}")


if __name__ == "__main__":
    main()

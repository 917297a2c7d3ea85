"""A segmentation model through the pipeline: an MR series of ``--slices`` slices of ``--size``
pixels (a disc and a bright cube), an attention U-Net with seeded random weights (channels
8/16/32/64, strides 2/2/2, model grid 32 x 64 x 64), attention and Seg-Grad-CAM maps, SEG + SC +
SR. Prints each step's seconds (median of ``--repeats`` runs) and the total against the issue's
anchor: 60 s for a 180-slice brain series end to end.

Usage: ``.venv/bin/python bench/volume.py [--slices 180] [--size 256] [--repeats 3] [--device cpu]``
"""

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dicom_node.config import Pipeline
from dicom_node.inference import InferenceRunner, ModelRegistry
from dicom_node.inference.architectures import BUILDERS
from dicom_node.inference.registry import sha256_of
from dicom_node.pipeline import default_steps, run
from dicom_node.store import InstanceStore
from tests.conftest import make_settings
from tests.store.test_store import put
from tests.test_pipeline import job_of
from tests.test_pipeline_volume import mr_series

ANCHOR_S = 60.0


def write_model(root: Path) -> None:
    folder = root / "brain"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    network = {"spatial_dims": 3, "channels": (8, 16, 32, 64), "strides": (2, 2, 2)}
    torch.save(BUILDERS["attention_unet"](1, 1, **network).state_dict(), folder / "weights.pt")
    (folder / "model.toml").write_text(
        'name = "brain"\nversion = "0.1"\ntask = "segmentation"\narchitecture = "attention_unet"\n'
        f'weights = "weights.pt"\nsha256 = "{sha256_of(folder / "weights.pt")}"\n'
        'cam_layer = "model.1.submodule.1.merge"\nintended_use = "benchmark"\n'
        '[network]\nspatial_dims = 3\nchannels = [8, 16, 32, 64]\nstrides = [2, 2, 2]\n'
        '[input]\nvolume = [32, 64, 64]\n[scope]\nmodalities = ["MR"]\n'
        '[[labels]]\nname = "lesion"\nthreshold = 0.5\n')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=180)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_model(root / "models")
        runner = InferenceRunner(ModelRegistry(root / "models"), device=args.device)
        for repeat in range(args.repeats):
            settings = make_settings(root / f"data{repeat}")
            pipeline = Pipeline(name="brain", model="brain", explain=("attention", "seggradcam"),
                                outputs=("seg", "sc", "sr"))
            settings = dataclasses.replace(settings, pipelines=(pipeline,))
            store = InstanceStore(settings.node.data_dir, 0)
            records = [put(store, ds) for ds in mr_series(slices=args.slices, size=args.size)]
            job = dataclasses.replace(job_of(records), pipeline="brain", model="brain")
            timings: dict[str, float] = {}
            started = time.perf_counter()
            ctx = run(job, timings, settings=settings, store=store, steps=default_steps(), runner=runner)
            timings["total"] = time.perf_counter() - started
            store.close()
            runs.append(timings)
            print(f"run {repeat + 1}: {timings['total']:.2f} s, {len(ctx.outputs)} objects", flush=True)
    for step in ("collect", "read", "preprocess", "inference", "explain", "encode", "store", "total"):
        print(f"{step:>10}: {statistics.median(r.get(step, 0.0) for r in runs):7.2f} s")
    total = statistics.median(r["total"] for r in runs)
    print(f"ratio to the {ANCHOR_S:.0f} s anchor: {total / ANCHOR_S:.3f}")


if __name__ == "__main__":
    main()

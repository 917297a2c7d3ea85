"""The prototype network through the pipeline: a held-out chest phantom (DX, ``--size`` pixels)
with the shipped demo-protopnet, explained with ``prototypes`` (an SC per top prototype of each
positive finding, the SR with a group per prototype). Prints each step's seconds (median of
``--repeats`` runs after one warm-up run) and the total against its anchor: the same image
through the same model explained with Grad-CAM (its quality figures included), the classifier
path the prototypes replace.

Usage: ``.venv/bin/python bench/prototypes.py [--size 2048] [--repeats 3] [--device cpu]``
"""

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.config import Pipeline
from dicom_node.inference import InferenceRunner, ModelRegistry
from dicom_node.phantoms import render, to_dataset
from dicom_node.pipeline import default_steps, run
from dicom_node.store import InstanceStore
from tests.conftest import make_settings
from tests.store.test_store import put
from tests.test_pipeline import job_of

MODELS = Path(__file__).resolve().parents[1] / "models"
SEED = 1_000_016  # held out: nodule, consolidation and cardiomegaly, all found by the model
STEPS = ("read", "preprocess", "inference", "explain", "encode", "store", "total")


def timed(runner: InferenceRunner, root: Path, size: int, explain: tuple[str, ...], repeats: int,
          ) -> dict[str, float]:
    """Median seconds per step of ``repeats`` runs (after a warm-up run)."""
    runs: list[dict[str, float]] = []
    source = to_dataset(render(SEED, size), modality="DX")
    for repeat in range(repeats + 1):
        settings = make_settings(root / f"{'-'.join(explain)}-{repeat}")
        pipeline = Pipeline(name="chest", model="demo-protopnet", explain=explain, outputs=("sc", "sr"))
        settings = dataclasses.replace(settings, pipelines=(pipeline,))
        store = InstanceStore(settings.node.data_dir, 0)
        job = dataclasses.replace(job_of([put(store, source)]), pipeline="chest", model="demo-protopnet")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        ctx = run(job, timings, settings=settings, store=store, steps=default_steps(), runner=runner)
        timings["total"] = time.perf_counter() - started
        store.close()
        if repeat:
            runs.append(timings)
        print(f"{'+'.join(explain)} run {repeat}{' (warm-up)' if not repeat else ''}: "
              f"{timings['total']:.2f} s, {len(ctx.outputs)} objects", flush=True)
    return {step: statistics.median(r.get(step, 0.0) for r in runs) for step in STEPS}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    runner = InferenceRunner(ModelRegistry(MODELS), device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        prototypes = timed(runner, Path(tmp), args.size, ("prototypes",), args.repeats)
        anchor = timed(runner, Path(tmp), args.size, ("gradcam",), args.repeats)
    print(f"{'step':>10}  prototypes  gradcam (s)")
    for step in STEPS:
        print(f"{step:>10}: {prototypes[step]:9.2f}  {anchor[step]:7.2f}")
    ratio = prototypes["total"] / anchor["total"]
    print(f"ratio to the Grad-CAM anchor ({anchor['total']:.2f} s): {ratio:.3f}")


if __name__ == "__main__":
    main()

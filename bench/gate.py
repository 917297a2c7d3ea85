"""The input-distribution gate: its cost on the inference step, and the demo model's figures.

Cost: the pipeline's inference step (forward pass, with the pooled-activation hook when gated)
plus the gate step, against the inference step alone, on 1-frame and 16-frame series of 128 px
inputs (preprocessing excluded: it is the same either way), interleaved; the minimum of
``--repeats`` (on a shared, loaded machine the minimum is the cost without other processes'
interference; medians there measure the neighbours).
Figures: the share of frames the demo gate abstains on, for held-out phantoms (seeds from
4,100,000, at 128, 256 and 512 px, CR/DX, MONOCHROME1/2) and for each generated
out-of-distribution set of ``tests/inference/ood.py`` (seeds from 5,100,000, 128 px).

Usage: ``.venv/bin/python bench/gate.py [--repeats 30] [--held-out 300] [--per-set 50]``
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from dicom_node.inference import InferenceRunner, ModelRegistry, Preprocessed, preprocess
from dicom_node.inference.calibrate import vectors
from dicom_node.inference.gate import frame_vectors
from dicom_node.phantoms import render, to_dataset
from tests.inference.ood import OOD_SETS, as_chest_cr

MODEL = "demo-cxr"


def _cost(runner: InferenceRunner, inputs: list[Preprocessed], repeats: int) -> tuple[float, float]:
    reference = runner.model(MODEL).reference
    assert reference is not None
    plain, gated = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.predict(MODEL, inputs)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        features: list[np.ndarray] = []
        runner.predict(MODEL, inputs, features)
        reference.score(frame_vectors(np.concatenate(features), np.stack([i.array for i in inputs])))
        gated.append(time.perf_counter() - started)
    return min(plain), min(gated)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cost-only", action="store_true")
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--per-set", type=int, default=50)
    args = parser.parse_args()
    runner = InferenceRunner(ModelRegistry(Path(__file__).resolve().parents[1] / "models"), device="cpu")
    loaded = runner.model(MODEL)
    assert loaded.manifest.gate is not None and loaded.reference is not None
    spec, threshold = loaded.manifest.input, loaded.manifest.gate.threshold
    frames = [item for i in range(16) for item in preprocess(to_dataset(render(4_200_000 + i, 512)), spec)]
    for count in (1, 16):
        plain, gated = _cost(runner, frames[:count], args.repeats)
        print(f"cost, {count:>2} frame(s): inference {plain * 1000:.2f} ms, inference + gate "
              f"{gated * 1000:.2f} ms: +{(gated / plain - 1) * 100:.1f}%")
    if args.cost_only:
        return
    held = [to_dataset(render(4_100_000 + i, (128, 256, 512)[i % 3]), modality="DX" if i % 2 else "CR",
                       photometric="MONOCHROME1" if i % 5 == 0 else "MONOCHROME2")
            for i in range(args.held_out)]
    scores = loaded.reference.score(vectors(runner, MODEL, [x for ds in held for x in preprocess(ds, spec)]))
    print(f"threshold {threshold}; held-out phantoms: {len(scores)}, "
          f"abstained {(scores > threshold).mean():.1%}, median score {np.median(scores):.2f}, "
          f"max {scores.max():.2f}")
    for name, generate in OOD_SETS.items():
        datasets = [as_chest_cr(generate(5_100_000 + i, 128), 5_100_000 + i) for i in range(args.per_set)]
        inputs = [x for ds in datasets for x in preprocess(ds, spec)]
        scores = loaded.reference.score(vectors(runner, MODEL, inputs))
        print(f"{name:<14} {len(scores)} images, abstained {(scores > threshold).mean():.1%}, "
              f"min score {scores.min():.2f}, median {np.median(scores):.2f}")


if __name__ == "__main__":
    main()

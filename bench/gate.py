"""The input-distribution gate: its cost on the inference step.

Cost: the pipeline's inference step (forward pass, with the pooled-activation hook when gated)
plus the gate step, against the inference step alone, on 1-frame and 16-frame series of 128 px
inputs (preprocessing excluded: it is the same either way), interleaved; the minimum of
``--repeats`` (on a shared, loaded machine the minimum is the cost without other processes'
interference; medians there measure the neighbours).
The demo model's abstention figures are measured by ``models/demo-cxr/calibrate_gate.py``.

Usage: ``.venv/bin/python bench/gate.py [--repeats 30]``
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from dicom_node.inference import InferenceRunner, ModelRegistry, Preprocessed, preprocess
from dicom_node.inference.gate import frame_vectors
from dicom_node.phantoms import render, to_dataset

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
    args = parser.parse_args()
    runner = InferenceRunner(ModelRegistry(Path(__file__).resolve().parents[1] / "models"), device="cpu")
    loaded = runner.model(MODEL)
    assert loaded.manifest.gate is not None and loaded.reference is not None
    spec = loaded.manifest.input
    frames = [item for i in range(16) for item in preprocess(to_dataset(render(4_200_000 + i, 512)), spec)]
    for count in (1, 16):
        plain, gated = _cost(runner, frames[:count], args.repeats)
        print(f"cost, {count:>2} frame(s): inference {plain * 1000:.2f} ms, inference + gate "
              f"{gated * 1000:.2f} ms: +{(gated / plain - 1) * 100:.1f}%")


if __name__ == "__main__":
    main()

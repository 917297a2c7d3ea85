"""The input-distribution gate: its cost on the inference step.

Cost: the pipeline's inference step alone, the same with the pooled-activation hook (as a gated
model runs it), and the gate step after it (image statistics and score), on 1-frame and 16-frame
series of 128 px inputs (preprocessing excluded: it is the same either way), interleaved
``--repeats`` times; minimum and median of each.
The demo model's abstention figures are measured by ``models/demo-cxr/calibrate_gate.py``.

Usage: ``.venv/bin/python bench/gate.py [--repeats 30]``
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from dicom_node.inference import InferenceRunner, ModelRegistry, Preprocessed, preprocess
from dicom_node.phantoms import render, to_dataset

MODEL = "demo-cxr"


def _cost(runner: InferenceRunner, inputs: list[Preprocessed], repeats: int) -> dict[str, list[float]]:
    """Seconds of the inference step alone, of the same with the pooled-activation hook, and of the
    gate step after it, interleaved ``repeats`` times."""
    reference = runner.model(MODEL).reference
    assert reference is not None
    spent: dict[str, list[float]] = {"inference": [], "hooked": [], "gate": []}
    for _ in range(repeats):
        started = time.perf_counter()
        runner.predict(MODEL, inputs)
        spent["inference"].append(time.perf_counter() - started)
        features: list[np.ndarray] = []
        started = time.perf_counter()
        runner.predict(MODEL, inputs, features)
        spent["hooked"].append(time.perf_counter() - started)
        started = time.perf_counter()
        reference.score(np.concatenate(features))
        spent["gate"].append(time.perf_counter() - started)
    return spent


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
        spent = _cost(runner, frames[:count], args.repeats)
        for name, pick in (("min", min), ("median", statistics.median)):
            plain, hooked, gate = (pick(spent[k]) * 1000 for k in ("inference", "hooked", "gate"))
            print(f"{count:>2} frame(s), {name}: inference {plain:.3f} ms, with the hook {hooked:.3f} ms, "
                  f"gate step {gate:.3f} ms: the gate adds {(hooked - plain + gate) / plain * 100:.1f}%")

if __name__ == "__main__":
    main()

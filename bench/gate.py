"""The input-distribution gate: its cost on the inference step.

Cost, as a job pays it: the pipeline's inference step of an ungated run, and of a gated run (the
pooled-activation hook and the image statistics it takes of each batch before its forward pass)
followed by the gate step (the score), on 1-frame and 16-frame series of 128 px inputs,
interleaved ``--repeats`` times in alternating order; minimum and median of each, and the median
of the per-repeat ratio. Each timed inference follows the preprocessing of its series
(untimed), as it does in a job: both runs then start in the same state (caches, the model's
worker threads), whereas back to back the second would find the first's forward pass still warm.
The demo model's abstention figures are measured by ``models/demo-cxr/calibrate_gate.py``.

``--architecture resnet18`` (or any torchvision name the manifest takes) measures a network of that
kind instead, with seeded random weights at 224 px and three channels, its CAM layer hooked (the
gate's other path) and a reference calibrated on 60 phantoms: the gate's cost does not depend on
the weights, only on the network's forward pass and the CAM layer's width.

Usage: ``.venv/bin/python bench/gate.py [--repeats 30] [--architecture resnet18 --cam-layer layer4]``
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from pydicom import Dataset

from dicom_node.inference import InferenceRunner, ModelRegistry, preprocess
from dicom_node.inference.architectures import BUILDERS
from dicom_node.inference.calibrate import calibrate_model
from dicom_node.inference.registry import sha256_of
from dicom_node.phantoms import render, to_dataset

MODEL = "demo-cxr"


def _torchvision_model(root: Path, architecture: str, cam_layer: str) -> None:
    """A model folder ``root/MODEL`` of ``architecture`` with seeded random weights, calibrated."""
    folder = root / MODEL
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(BUILDERS[architecture](4, 3).state_dict(), folder / "weights.pt")
    labels = "".join(f'\n[[labels]]\nname = "finding{i}"\nthreshold = 0.5\n' for i in range(4))
    (folder / "model.toml").write_text(
        f'name = "{MODEL}"\nversion = "0.1"\narchitecture = "{architecture}"\nweights = "weights.pt"\n'
        f'sha256 = "{sha256_of(folder / "weights.pt")}"\ncam_layer = "{cam_layer}"\n'
        'intended_use = "benchmark only"\n[input]\nsize = 224\nchannels = 3\nnormalization = "imagenet"\n'
        f'[scope]\nmodalities = ["CR", "DX"]\n{labels}')
    phantoms = root / "phantoms"
    phantoms.mkdir()
    for i in range(60):
        to_dataset(render(4_400_000 + i, 256)).save_as(phantoms / f"{i}.dcm", enforce_file_format=True)
    calibrate_model(root, MODEL, phantoms, update=True)


def _cost(runner: InferenceRunner, datasets: list[Dataset], repeats: int) -> dict[str, list[float]]:
    """Seconds of the inference step alone, and of the gated inference step and the gate step after
    it, interleaved ``repeats`` times, each after preprocessing ``datasets``; the two swap places
    every repeat, so that neither always runs second (on a warmer cache, or a busier CPU)."""
    loaded = runner.model(MODEL)
    reference = loaded.reference
    assert reference is not None

    def plain() -> None:
        runner.predict(MODEL, inputs)

    def gated() -> None:
        features: list[np.ndarray] = []
        runner.predict(MODEL, inputs, features)
        reference.score(features)

    spent: dict[str, list[float]] = {"inference": [], "gated": []}
    runs = [("inference", plain), ("gated", gated)]
    for repeat in range(repeats):
        for name, run in runs if repeat % 2 == 0 else runs[::-1]:
            inputs = [item for ds in datasets for item in preprocess(ds, loaded.manifest.input)]
            started = time.perf_counter()
            run()
            spent[name].append(time.perf_counter() - started)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--architecture", help="a torchvision network instead of the demo model")
    parser.add_argument("--cam-layer", default="layer4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        models = Path(__file__).resolve().parents[1] / "models"
        if args.architecture:
            models = Path(scratch)
            _torchvision_model(models, args.architecture, args.cam_layer)
        measure(InferenceRunner(ModelRegistry(models), device="cpu"), args.repeats)


def measure(runner: InferenceRunner, repeats: int) -> None:
    """Print the gate's cost at 1 and 16 frames."""
    loaded = runner.model(MODEL)
    assert loaded.manifest.gate is not None and loaded.reference is not None
    datasets = [to_dataset(render(4_200_000 + i, 512)) for i in range(16)]
    for count in (1, 16):
        spent = _cost(runner, datasets[:count], repeats)
        ratios = [gated / plain - 1 for plain, gated in zip(spent["inference"], spent["gated"], strict=True)]
        for name, pick in (("min", min), ("median", statistics.median)):
            plain, gated = (pick(spent[k]) * 1000 for k in ("inference", "gated"))
            print(f"{count:>2} frame(s), {name}: inference {plain:.3f} ms, gated inference and gate step "
                  f"{gated:.3f} ms: the gate adds {(gated - plain) / plain * 100:.1f}%")
        print(f"{count:>2} frame(s), median of the per-repeat ratio: the gate adds "
              f"{statistics.median(ratios) * 100:.1f}%")


if __name__ == "__main__":
    main()

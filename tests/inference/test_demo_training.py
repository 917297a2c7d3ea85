"""The demo model's training script: seeded to the byte on a tiny run, and its perturbation
augmentation labels what the perturbed image shows (no training of the real model here)."""

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "models" / "demo-cxr" / "train.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(out: Path) -> str:
    subprocess.run([sys.executable, str(SCRIPT), "--train", "8", "--held-out", "4", "--epochs", "1",
                    "--batch", "4", "--out", str(out)], check=True, capture_output=True, timeout=300)
    return hashlib.sha256((out / "weights.pt").read_bytes()).hexdigest()


def test_a_tiny_training_run_gives_the_same_weights_twice(tmp_path: Path) -> None:
    first, second = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert first == second
    assert f'sha256 = "{first}"' in (tmp_path / "a" / "model.toml").read_text()


def test_a_focal_finding_blurred_out_is_labelled_absent_and_one_left_visible_is_not() -> None:
    script = _script()
    size = 64
    x = torch.rand(64, 1, size, size)
    y = torch.ones(64, len(script.LABELS))
    masks = torch.zeros(64, len(script.FOCAL), size, size, dtype=torch.bool)
    masks[:, 0, 4:12, 4:12] = True  # a nodule in a corner
    masks[:, 1, 28:36, 28:36] = True  # a consolidation in the middle
    perturbed, labels = script.perturbed(x, y, masks, torch.Generator().manual_seed(0), share=1.0)
    changed = (perturbed != x).flatten(1)
    assert changed.any(dim=1).all()  # every image was perturbed (share=1)
    nodule, consolidation = (script.LABELS.index(label) for label in script.FOCAL)
    blurred = script.blurred(x)
    for k in range(len(x)):
        for j, column in ((0, nodule), (1, consolidation)):
            hidden = ((perturbed[k] == blurred[k]) & (x[k] != blurred[k]))[0][masks[k, j]].float().mean()
            assert labels[k, column] == float(hidden <= 0.5), (k, j, float(hidden))
    # the global findings keep their labels; both outcomes occur for the focal ones
    assert (labels[:, [i for i in range(len(script.LABELS)) if i not in (nodule, consolidation)]] == 1).all()
    assert 0 < labels[:, nodule].sum() < len(x) and 0 < labels[:, consolidation].sum() < len(x)

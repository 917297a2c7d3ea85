"""The demo model's training script: the whole script seeded to the byte on a tiny run (the same
machine), its perturbation repeatable for a seed, and labels that follow what it blurred out (no
training of the real model here)."""

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
    done = subprocess.run([sys.executable, str(SCRIPT), "--train", "8", "--held-out", "4", "--epochs", "1",
                           "--batch", "4", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return hashlib.sha256((out / "weights.pt").read_bytes()).hexdigest()


def test_a_tiny_training_run_gives_the_same_weights_twice(tmp_path: Path) -> None:
    first, second = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert first == second
    assert f'sha256 = "{first}"' in (tmp_path / "a" / "model.toml").read_text()


def _batch(size: int = 64, count: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded batch with a nodule in a corner and a consolidation in the middle of every image."""
    script = _script()
    x = torch.rand(count, 1, size, size, generator=torch.Generator().manual_seed(1))
    y = torch.ones(count, len(script.LABELS))
    masks = torch.zeros(count, len(script.FOCAL), size, size, dtype=torch.bool)
    masks[:, 0, 4:12, 4:12] = True
    masks[:, 1, 28:36, 28:36] = True
    return x, y, masks


def test_the_perturbation_repeats_for_a_seed_and_changes_with_it() -> None:
    script = _script()
    x, y, masks = _batch()
    first = script.perturbed(x, y, masks, torch.Generator().manual_seed(3))
    again = script.perturbed(x, y, masks, torch.Generator().manual_seed(3))
    other = script.perturbed(x, y, masks, torch.Generator().manual_seed(4))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_a_focal_finding_blurred_out_is_labelled_absent_and_one_left_visible_is_not() -> None:
    script = _script()
    size = 64
    x = torch.rand(64, 1, size, size, generator=torch.Generator().manual_seed(0))
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

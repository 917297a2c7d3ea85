"""The committed brain lesion model: it verifies, its shipped figures hold on held-out phantoms
segmented as the pipeline does, and its training script gives the same bytes twice on a tiny run
(no training of the real model here)."""

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from dicom_node.explain.sanity import verify_models
from dicom_node.inference import ModelRegistry
from dicom_node.inference.registry import LoadedModel
from dicom_node.phantoms.brain import render_brain

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
FOLDER = MODELS / "brain-lesion"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"brain_lesion_{name}", FOLDER / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return ModelRegistry(MODELS).load("brain-lesion")


@pytest.fixture(scope="module")
def metrics() -> dict[str, Any]:
    return json.loads((FOLDER / "metrics.json").read_text())


def test_the_shipped_folder_verifies_beside_the_demo_model(loaded: LoadedModel,
                                                              metrics: dict[str, Any]) -> None:
    lines = verify_models(ModelRegistry(MODELS))
    assert any(line.startswith("sanity brain-lesion 1.0.0: not run") for line in lines)
    manifest = loaded.manifest
    assert manifest.task == "segmentation" and manifest.label_names == ("lesion",)
    assert hashlib.sha256(manifest.weights.read_bytes()).hexdigest() == manifest.sha256 == metrics["sha256"]
    train = _script("train")
    assert manifest.input.volume == train.GRID and manifest.network is not None
    assert manifest.network.parameters() == {k: tuple(v) if isinstance(v, list) else v
                                             for k, v in train.NETWORK.items()}
    card = (FOLDER / "MODEL_CARD.md").read_text()
    assert manifest.sha256 in card and "not for clinical use" in card


def _case(metrics: dict[str, Any], seed: int) -> dict[str, Any]:
    [case] = [c for c in metrics["cases"] if c["seed"] == seed]
    return case


@pytest.mark.parametrize("index", [0, 1, 4])
def test_held_out_phantoms_segment_as_the_card_says(loaded: LoadedModel, metrics: dict[str, Any],
                                                    index: int) -> None:
    evaluate = _script("evaluate")
    seed = evaluate.HELD_OUT_SEED + index
    lesion = index % evaluate.LESION_FREE_EVERY != evaluate.LESION_FREE_EVERY - 1
    case = evaluate.evaluate_case(loaded, render_brain(seed, spacing=2.0, lesion=lesion), explain=False)
    shipped = _case(metrics, seed)
    if not lesion:
        assert case["false_positive_voxels"] == shipped["false_positive_voxels"] == 0
        return
    assert shipped["truth_cm3"] >= evaluate.MIN_LESION_CM3
    assert case["dice"] >= 0.8 and abs(case["volume_error"]) <= 0.1
    assert case["dice"] == pytest.approx(shipped["dice"], abs=0.01)
    assert case["found_cm3"] == pytest.approx(shipped["found_cm3"], rel=0.01)


def test_a_tiny_training_run_gives_the_same_weights_twice(tmp_path: Path) -> None:
    train = _script("train")
    tiny = ["--train", "2", "--spacing", "6", "--grid", "30", "40", "32", "--steps", "3", "--batch", "2",
            "--crop", "32", "--validation", "2", "--threads", "1"]
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    rng = torch.random.get_rng_state()
    try:
        digests = []
        for run in ("a", "b"):
            assert train.main([*tiny, "--out", str(tmp_path / run)]) == 0
            digests.append(hashlib.sha256((tmp_path / run / "weights.pt").read_bytes()).hexdigest())
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
    assert digests[0] == digests[1]
    assert f'sha256 = "{digests[0]}"' in (tmp_path / "a" / "model.toml").read_text()
    figures = json.loads((tmp_path / "a" / "training.json").read_text())
    assert figures["seeds"] == [0, 1] and figures["steps"] == 3

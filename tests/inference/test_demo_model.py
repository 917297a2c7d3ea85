"""The committed demo model: it verifies, loads the same way twice, and finds what phantoms hold."""

from pathlib import Path

import pytest
import torch

from dicom_node.cli import main
from dicom_node.inference import InferenceRunner, ModelRegistry, preprocess
from dicom_node.phantoms import LABELS, render, to_dataset

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"

CASES = [
    {},
    {"nodule": True},
    {"consolidation": True},
    {"effusion": True},
    {"cardiomegaly": True},
    {"nodule": True, "effusion": True, "cardiomegaly": True},
    {"consolidation": True, "effusion": True},
]


@pytest.fixture(scope="module")
def runner() -> InferenceRunner:
    return InferenceRunner(ModelRegistry(MODELS), device="cpu")


def test_the_repository_and_the_default_config_verify(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "verify", "--config", str(REPO / "config" / "node.toml")]) == 0
    shipped = sorted(p.parent.name for p in MODELS.glob("*/model.toml"))
    assert shipped == ["brain-lesion", "demo-cxr", "demo-protopnet"]
    assert f"ok: {len(shipped)} model(s)" in capsys.readouterr().out
    manifest = ModelRegistry(MODELS).manifest("demo-cxr")
    assert manifest.label_names == LABELS
    assert "not for clinical use" in manifest.intended_use
    card = (MODELS / "demo-cxr" / "MODEL_CARD.md").read_text()
    assert "research demo trained on synthetic phantoms, not for clinical use" in card.lower()
    assert manifest.sha256 in card


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_the_demo_model_finds_what_held_out_phantoms_hold(runner: InferenceRunner, photometric: str) -> None:
    inputs, truth = [], []
    for i, findings in enumerate(CASES):
        seed = 2_000_000 + i  # never used in training or in the model card's held-out set
        ds = to_dataset(render(seed, 768, findings=findings), modality="CR", photometric=photometric)
        inputs += preprocess(ds, runner.model("demo-cxr").manifest.input)
        truth.append(sorted(label for label, present in findings.items() if present))
    predictions = runner.predict("demo-cxr", inputs)
    assert [sorted(p.positives) for p in predictions] == truth
    assert all(p.model == "demo-cxr" and p.model_version == "3.0.0" for p in predictions)


def test_loading_twice_gives_identical_outputs() -> None:
    ds = to_dataset(render(2_100_000, 512, findings={"nodule": True}))
    first = InferenceRunner(ModelRegistry(MODELS), device="cpu")
    second = InferenceRunner(ModelRegistry(MODELS), device="cpu")
    inputs = preprocess(ds, first.model("demo-cxr").manifest.input)
    assert torch.equal(first.logits("demo-cxr", inputs), second.logits("demo-cxr", inputs))


def test_the_default_configs_commented_pipelines_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """config/node.toml's commented brain and prototype pipelines, uncommented, pass `models verify`."""
    import re

    text = (REPO / "config" / "node.toml").read_text()
    keys = r"\[\[pipelines\]\]|name = \"(?:brain|chest-prototypes)\"|(?:model|match|explain|outputs|send_to) = .*"
    enabled = re.sub(rf"^# ({keys})$", r"\1", text, flags=re.MULTILINE)
    assert enabled.count("[[pipelines]]") == 3
    config = tmp_path / "config" / "node.toml"  # the config's paths are relative to its folder
    config.parent.mkdir()
    config.write_text(enabled.replace('dir = "../models"', f'dir = "{MODELS}"'))
    assert main(["models", "verify", "--config", str(config)]) == 0
    assert "3 pipeline(s) checked" in capsys.readouterr().out

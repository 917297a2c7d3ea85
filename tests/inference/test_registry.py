"""The model repository: every manifest mistake gets one clear error; BYO weights load and run."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.inference.manifest import ModelError, load_manifest
from dicom_node.inference.preprocess import LetterboxMap, Preprocessed
from dicom_node.inference.registry import ModelRegistry
from dicom_node.inference.runner import InferenceRunner, select_device
from tests.inference.models import LABELS, write_model


def edit(manifest: Path, pattern: str, replacement: str) -> None:
    text = manifest.read_text()
    assert re.search(pattern, text, flags=re.M), pattern
    manifest.write_text(re.sub(pattern, replacement, text, count=1, flags=re.M))


def error_of(root: Path) -> str:
    with pytest.raises(ModelError) as info:
        ModelRegistry(root).verify()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_valid_model_loads_and_reads_its_manifest(tmp_path: Path) -> None:
    path = write_model(tmp_path)
    [manifest] = ModelRegistry(tmp_path).verify()
    assert manifest.path == path and manifest.label_names == LABELS
    assert manifest.input.size == 64 and manifest.modalities == ("CR", "DX")
    assert load_manifest(path) == manifest


@pytest.mark.parametrize(
    ("pattern", "replacement", "expected"),
    [
        (r'^weights = .*$', 'weights = "missing.pt"', "key 'weights' = 'missing.pt' is invalid; expected an existing file"),
        (r'^sha256 = .*$', f'sha256 = "{"0" * 64}"', "key 'sha256'"),
        (r'^sha256 = .*$', 'sha256 = "abc"', "64 hex digits"),
        (r'^cam_layer = .*$', 'cam_layer = "features.conv9"', "key 'cam_layer' = 'features.conv9' is invalid"),
        (r'^architecture = .*$', 'architecture = "vgg99"', "key 'architecture' = 'vgg99' is invalid"),
        (r'^version = .*\n', '', "required key 'version' is missing"),
        (r'^size = 64$', 'size = "big"', "key 'input.size' = 'big' is invalid"),
        (r'^channels = 1$', 'channels = 2', "key 'input.channels' = 2"),
        (r'^threshold = 0.5$', 'threshold = 1.5', "key 'labels[0].threshold' = 1.5"),
        (r'^name = "tiny"$', 'name = "other"', "expected the folder's name 'tiny'"),
        (r'^intended_use', 'colour = "red"\nintended_use', "unknown key(s) ['colour']"),
        (r'^\[input\]', '[input', "not valid TOML"),
        (r'^channels = 1$', 'channels = 1\nwindow_centre = 40', "unknown key(s) ['window_centre'] in table 'input'"),
        (r'^threshold = 0.5$', 'treshold = 0.9', "unknown key(s) ['treshold'] in table 'labels[0]'"),
        (r'^channels = 1$', 'channels = 1\nwindow_center = nan\nwindow_width = 400', "key 'input.window_center' = nan"),
        (r'^cam_layer = .*$', 'cam_layer = ""', "key 'cam_layer' = '' is invalid"),
    ],
)
def test_each_manifest_mistake_names_the_file_and_key(
    tmp_path: Path, pattern: str, replacement: str, expected: str
) -> None:
    manifest = write_model(tmp_path)
    edit(manifest, pattern, replacement)
    message = error_of(tmp_path)
    assert str(manifest) in message and expected in message


def test_label_count_must_equal_the_model_outputs(tmp_path: Path) -> None:
    manifest = write_model(tmp_path)
    manifest.write_text(manifest.read_text() + '\n[[labels]]\nname = "extra"\n')
    message = error_of(tmp_path)
    # the weights were saved for 4 outputs: the state dict does not fit 5 labels
    assert "key 'weights'" in message and "5 labels" in message


def test_label_count_mismatch_of_a_torchscript_model(tmp_path: Path) -> None:
    manifest = write_model(tmp_path, architecture="torchscript")
    manifest.write_text(manifest.read_text() + '\n[[labels]]\nname = "extra"\n')
    assert "key 'labels' lists 5 labels but the model outputs (1, 4)" in error_of(tmp_path)


def test_weights_that_are_not_a_state_dict(tmp_path: Path) -> None:
    manifest = write_model(tmp_path)
    weights = manifest.parent / "weights.pt"
    weights.write_bytes(b"not a torch file")
    from dicom_node.inference.registry import sha256_of

    edit(manifest, r'^sha256 = .*$', f'sha256 = "{sha256_of(weights)}"')
    assert "cannot read a state dict" in error_of(tmp_path)


def test_byo_densenet121_state_dict_with_14_labels(tmp_path: Path) -> None:
    labels = tuple(f"finding{i}" for i in range(14))
    write_model(tmp_path, "chexnet", architecture="densenet121", labels=labels, size=224, channels=3,
                cam_layer="features.norm5", normalization="imagenet")
    registry = ModelRegistry(tmp_path)
    [manifest] = registry.verify()
    runner = InferenceRunner(registry, device="cpu", batch_size=2)
    inputs = [Preprocessed(np.random.default_rng(i).random((3, 224, 224), dtype=np.float32),
                           LetterboxMap.fit(224, 224, 224), f"1.2.{i}", 0, None, "file") for i in range(3)]
    predictions = runner.predict("chexnet", inputs)
    assert [p.sop_instance_uid for p in predictions] == ["1.2.0", "1.2.1", "1.2.2"]
    assert all(set(p.probabilities) == set(labels) for p in predictions)
    assert all(0 < v < 1 for p in predictions for v in p.probabilities.values())
    assert predictions[0].weights_sha256 == manifest.sha256 and predictions[0].model_version == "0.1"


def test_runner_loads_once_and_batches_like_single_frames(tmp_path: Path) -> None:
    write_model(tmp_path)
    runner = InferenceRunner(ModelRegistry(tmp_path), device="cpu", batch_size=4)
    inputs = [Preprocessed(np.random.default_rng(i).random((1, 64, 64), dtype=np.float32),
                           LetterboxMap.fit(64, 64, 64), f"1.{i}", 0, None, "file") for i in range(6)]
    batched = runner.logits("tiny", inputs)
    single = torch.cat([runner.logits("tiny", [p]) for p in inputs])
    assert torch.allclose(batched, single, atol=1e-5)
    assert runner.model("tiny") is runner.model("tiny")
    assert not runner.model("tiny").module.training


def test_device_selection() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")


def test_an_empty_or_missing_repository_has_no_models(tmp_path: Path) -> None:
    assert ModelRegistry(tmp_path / "absent").names() == []
    with pytest.raises(ModelError, match="no model 'x'"):
        ModelRegistry(tmp_path).manifest("x")


def test_a_manifest_that_is_not_utf8(tmp_path: Path) -> None:
    manifest = write_model(tmp_path)
    manifest.write_bytes(manifest.read_bytes().replace(b"tests only", b"tests \xff only"))
    assert "not UTF-8 text" in error_of(tmp_path)

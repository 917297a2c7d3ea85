"""The input-distribution gate: the reference file, the manifest's [gate], and the demo model's
gate on held-out phantoms and on generated out-of-distribution sets."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from dicom_node.inference import InferenceRunner, ModelError, ModelRegistry, load_manifest, preprocess
from dicom_node.inference.calibrate import calibrate, vectors
from dicom_node.inference.gate import ReferenceError, fit_reference, load_reference, save_reference
from dicom_node.inference.registry import sha256_of
from dicom_node.phantoms import render, to_dataset
from tests.inference.ood import OOD_SETS, as_chest_cr

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
HELD_OUT_SEED = 4_000_000  # the reference uses 3,000,000 to 3,000,499; training and the card others
OOD_SEED = 5_000_000


@pytest.fixture(scope="module")
def runner() -> InferenceRunner:
    return InferenceRunner(ModelRegistry(REPO_MODELS), device="cpu")


def _scores(runner: InferenceRunner, datasets: list) -> np.ndarray:
    loaded = runner.model("demo-cxr")
    inputs = [item for ds in datasets for item in preprocess(ds, loaded.manifest.input)]
    assert loaded.reference is not None
    return loaded.reference.score(vectors(runner, "demo-cxr", inputs))


def test_the_reference_round_trips_and_scores_its_own_kind_low(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.normal(0, 1, (400, 6)) @ rng.normal(0, 1, (6, 6))
    reference = fit_reference(frames, feature_count=2)
    save_reference(reference, tmp_path / "r.npz")
    again = load_reference(tmp_path / "r.npz")
    far = frames[:50] + 25.0
    assert np.allclose(again.score(frames), reference.score(frames))
    assert np.median(again.score(frames)) < 1.5 < again.score(far).min()
    with pytest.raises(ReferenceError, match="describes 6 values"):
        again.score(frames[:, :5])


def test_a_file_that_is_not_a_reference_is_refused(tmp_path: Path) -> None:
    (tmp_path / "r.npz").write_bytes(b"not a reference")
    with pytest.raises(ReferenceError, match="not a gate reference"):
        load_reference(tmp_path / "r.npz")
    with pytest.raises(ReferenceError, match="at least 10 frames"):
        fit_reference(np.zeros((5, 3)), 1)


def test_calibration_holds_out_frames_and_sets_a_threshold_above_them() -> None:
    rng = np.random.default_rng(1)
    result = calibrate(rng.normal(0, 1, (300, 8)), feature_count=4, seed=0)
    assert len(result.held_out_scores) == 60 and result.reference.images == 240
    assert result.false_abstention <= 0.05 and result.threshold > float(np.median(result.held_out_scores))
    with pytest.raises(ValueError, match="at least 20 frames"):
        calibrate(rng.normal(0, 1, (10, 8)), 4)


def _copy_demo(tmp_path: Path) -> Path:
    shutil.copytree(REPO_MODELS / "demo-cxr", tmp_path / "demo-cxr")
    return tmp_path / "demo-cxr" / "model.toml"


@pytest.mark.parametrize("change, message", [
    (('threshold = 1.', 'threshold = -1.'), "gate.threshold"),
    (('action = "abstain"', 'action = "ignore"'), "gate.action"),
    (('reference = "reference.npz"', 'reference = "missing.npz"'), "expected an existing file"),
])
def test_a_bad_gate_table_is_refused_naming_the_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    manifest = _copy_demo(tmp_path)
    manifest.write_text(manifest.read_text().replace(*change))
    with pytest.raises(ModelError, match=message):
        ModelRegistry(tmp_path).load("demo-cxr")


def test_a_changed_reference_file_is_refused_by_its_sha256(tmp_path: Path) -> None:
    manifest = _copy_demo(tmp_path)
    gate = load_manifest(manifest).gate
    assert gate is not None and gate.action == "abstain"
    rng = np.random.default_rng(2)
    save_reference(fit_reference(rng.normal(0, 1, (50, 4)), 1), gate.reference)
    with pytest.raises(ModelError, match=r"'gate\.sha256'"):
        ModelRegistry(tmp_path).load("demo-cxr")


def test_a_reference_of_other_weights_is_refused(tmp_path: Path) -> None:
    import dataclasses

    manifest = _copy_demo(tmp_path)
    gate = load_manifest(manifest).gate
    assert gate is not None
    stale = dataclasses.replace(load_reference(gate.reference), weights_sha256="0" * 64)
    save_reference(stale, gate.reference)
    manifest.write_text(manifest.read_text().replace(gate.sha256, sha256_of(gate.reference)))
    with pytest.raises(ModelError, match="describes the activations of weights 000000000000"):
        ModelRegistry(tmp_path).load("demo-cxr")


def test_the_demo_gate_passes_held_out_phantoms(runner: InferenceRunner) -> None:
    datasets = [to_dataset(render(HELD_OUT_SEED + i, 128), modality="DX" if i % 2 else "CR",
                           photometric="MONOCHROME1" if i % 7 == 0 else "MONOCHROME2") for i in range(100)]
    scores = _scores(runner, datasets)
    threshold = runner.model("demo-cxr").manifest.gate.threshold  # type: ignore[union-attr]
    assert float((scores > threshold).mean()) <= 0.01, np.sort(scores)[-5:]


@pytest.mark.parametrize("name", sorted(OOD_SETS))
def test_the_demo_gate_abstains_on_out_of_distribution_sets(runner: InferenceRunner, name: str) -> None:
    generate = OOD_SETS[name]
    datasets = [as_chest_cr(generate(OOD_SEED + i, 128), OOD_SEED + i) for i in range(20)]
    scores = _scores(runner, datasets)
    threshold = runner.model("demo-cxr").manifest.gate.threshold  # type: ignore[union-attr]
    assert float((scores > threshold).mean()) >= 0.95, (name, np.sort(scores)[:5])


def test_a_frame_whose_score_is_not_a_number_is_outside() -> None:
    from dicom_node.inference.gate import GateResult

    assert GateResult("2.25.1", 0, float("nan"), 1.9).outside
    assert GateResult("2.25.1", 0, float("inf"), 1.9).outside
    assert not GateResult("2.25.1", 0, 1.9, 1.9).outside


def _statistics_frame_by_frame(image: np.ndarray) -> np.ndarray:
    """The image statistics of one (size, size) luminance image, written plainly."""
    from dicom_node.inference.gate import GRID, QUANTILES, THUMBNAIL

    cell = image.shape[0] // GRID
    grid = image[:GRID * cell, :GRID * cell].reshape(GRID, cell, GRID, cell).mean(axis=(1, 3))
    ranked = np.sort(grid.ravel())
    quantiles = [ranked[round(q * (grid.size - 1))] for q in QUANTILES]
    edges = [np.abs(np.diff(grid, axis=0)).mean(), np.abs(np.diff(grid, axis=1)).mean(),
             np.log(np.abs(grid - grid[:, ::-1]).mean() + 1e-4)]
    step = GRID // THUMBNAIL
    thumbnail = grid.reshape(THUMBNAIL, step, THUMBNAIL, step).mean(axis=(1, 3)).ravel()
    return np.concatenate([quantiles, [grid.mean(), grid.std()], edges, thumbnail])


@pytest.mark.parametrize("channels, size", [(1, 128), (3, 100)])
def test_the_batched_image_statistics_are_those_of_each_frame(channels: int, size: int) -> None:
    from dicom_node.inference.gate import STATISTICS, image_statistics

    rng = np.random.default_rng(3)
    arrays = rng.random((5, channels, size, size), dtype=np.float32)
    arrays[1] = arrays[1, :, :, ::-1]  # a mirrored frame: its asymmetry differs from the others'
    arrays[2] = 0.5  # a constant frame: no spread, no edges
    expected = np.stack([_statistics_frame_by_frame(frame.mean(axis=0, dtype=np.float64)) for frame in arrays])
    got = image_statistics(arrays)
    assert got.shape == (5, STATISTICS)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(image_statistics(arrays[3:4]), got[3:4], rtol=1e-6)


def test_the_own_network_gives_the_mean_of_the_cam_layer_and_the_same_logits() -> None:
    """The demo network's own global average pooling is read (no hook, no second mean): the
    vector is the CAM layer's mean, the logits those of a plain forward; explained at another
    layer, the same network is hooked there."""
    import types

    import torch

    from dicom_node.inference.architectures import CompactCNN
    from dicom_node.inference.gate import FeatureCapture, pool

    torch.manual_seed(0)
    model = CompactCNN(4).eval()
    x = torch.rand(3, 1, 64, 64)
    names = list(model.features._modules)
    for layer, direct in (("features.relu4", True), ("features.relu3", False)):
        manifest = types.SimpleNamespace(cam_layer=layer, path=Path("model.toml"))
        with torch.inference_mode(), FeatureCapture(model, manifest) as capture:  # type: ignore[arg-type]
            assert capture.direct is direct
            logits, pooled = capture.forward(x)
            # the activations of ``layer``: the feature modules up to it, run on their own
            expected = pool(model.features[:names.index(layer.split(".")[1]) + 1](x))
            torch.testing.assert_close(logits, model(x))
        assert not model.features.relu3._forward_hooks  # the hook is removed on leaving
        assert pooled.shape == (3, 64 if direct else 32)
        np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)


def test_a_reference_whose_precision_is_not_positive_definite_is_refused(tmp_path: Path) -> None:
    import dataclasses

    manifest = _copy_demo(tmp_path)
    gate = load_manifest(manifest).gate
    assert gate is not None
    reference = load_reference(gate.reference)
    save_reference(dataclasses.replace(reference, precision=-reference.precision), gate.reference)
    manifest.write_text(manifest.read_text().replace(gate.sha256, sha256_of(gate.reference)))
    with pytest.raises(ModelError, match="not positive definite"):
        ModelRegistry(tmp_path).load("demo-cxr")


def _twice(tmp_path: Path) -> Path:
    """A ResNet-18 whose ``cam_layer`` is ``layer4.1.relu``: torchvision's block calls it twice."""
    from tests.inference.models import write_model

    return write_model(tmp_path, "twice", architecture="resnet18", cam_layer="layer4.1.relu", channels=3,
                       size=64, normalization="imagenet")


def test_a_cam_layer_run_twice_a_forward_is_refused_at_inference(tmp_path: Path) -> None:
    from dicom_node.inference.preprocess import LetterboxMap, Preprocessed

    _twice(tmp_path)
    runner = InferenceRunner(ModelRegistry(tmp_path), device="cpu", batch_size=2)
    inputs = [Preprocessed(np.random.default_rng(i).random((3, 64, 64), dtype=np.float32),
                           LetterboxMap.fit(64, 64, 64), f"1.2.{i}", 0, None, "file") for i in range(3)]
    assert len(runner.predict("twice", inputs)) == 3  # without the gate, the layer is only CAM's
    with pytest.raises(ModelError, match=r"'cam_layer' = 'layer4\.1\.relu' ran 2 times"):
        runner.predict("twice", inputs, features=[])


def test_a_cam_layer_run_twice_a_forward_is_refused_at_load(tmp_path: Path) -> None:
    import dataclasses

    from dicom_node.inference.gate import STATISTICS

    manifest = _twice(tmp_path)
    reference = fit_reference(np.random.default_rng(3).normal(0, 1, (40, 512 + STATISTICS)), 512)
    sha = load_manifest(manifest).sha256
    save_reference(dataclasses.replace(reference, weights_sha256=sha), tmp_path / "twice" / "reference.npz")
    manifest.write_text(manifest.read_text() + f'\n[gate]\nreference = "reference.npz"\nsha256 = '
                        f'"{sha256_of(tmp_path / "twice" / "reference.npz")}"\nthreshold = 2.0\naction = "abstain"\n')
    with pytest.raises(ModelError, match=r"'cam_layer' = 'layer4\.1\.relu' ran 2 times"):
        ModelRegistry(tmp_path).load("twice")


def test_a_foreign_submodule_named_pooled_layer_is_not_taken_for_the_method() -> None:
    """Only the node's own networks are asked for their pooled layer: a model brought by its
    user with a submodule of that name gets its CAM layer pooled as any other."""
    import types

    import torch
    from torch import nn

    from dicom_node.inference.gate import FeatureCapture, pool

    class Foreign(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
            self.pooled_layer = nn.Identity()  # called with a layer name, it would answer that name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pooled_layer(self.features(x)).mean(dim=(2, 3))

    torch.manual_seed(0)
    model = Foreign().eval()
    x = torch.rand(2, 1, 16, 16)
    manifest = types.SimpleNamespace(cam_layer="features.1", path=Path("model.toml"))
    with torch.inference_mode(), FeatureCapture(model, manifest) as capture:  # type: ignore[arg-type]
        assert not capture.direct
        captured = capture.forward(x)[1]
        expected = pool(model.features(x))
    assert captured.shape == (2, 4)
    np.testing.assert_allclose(captured, expected, rtol=1e-5, atol=1e-6)


def test_the_standard_deviation_holds_when_the_mean_is_large_against_the_spread() -> None:
    """E[x^2] - mean^2 in float32 cancelled to 0 for an input of -1024 plus a little (HU-like
    normalisation); the deviations' squares keep it."""
    from dicom_node.inference.gate import GRID, QUANTILES, image_statistics

    rng = np.random.default_rng(0)
    arrays = np.full((2, 1, 256, 256), -1024, np.float32) + rng.random((2, 1, 256, 256), dtype=np.float32) * 0.01
    block = 256 // GRID
    truth = arrays[:, 0].astype(np.float64).reshape(2, GRID, block, GRID, block).mean(axis=(2, 4))
    std = image_statistics(arrays)[:, len(QUANTILES) + 1]
    np.testing.assert_allclose(std, truth.reshape(2, -1).std(axis=1), rtol=0.02)

"""The cascading randomisation check (Adebayo et al. 2018) and ``models verify``'s use of it."""

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from dicom_node.explain.quality import sobel_map
from dicom_node.explain.sanity import (
    MIN_IMAGES_PER_LABEL,
    SanityResult,
    cache_path,
    cached_result,
    cascade,
    check_model,
    gradcam_explainer,
    randomisable_layers,
    refusal,
    verify_models,
)
from dicom_node.inference import ModelError, ModelRegistry
from tests.inference.models import write_model

REPO = Path(__file__).resolve().parents[2]


def edges_regardless_of_weights(model: nn.Module, images: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """An "explanation" that is the input's edges whatever the model's weights."""
    return torch.stack([sobel_map(image) for image in images])


def small_images(count: int = 8, size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = 0.2 + 0.1 * torch.rand(count, 1, size, size, generator=generator)
    for i in range(count):
        y, x = 8 + 5 * i % 40, 12 + 7 * i % 36
        images[i, 0, y:y + 12, x:x + 12] += 0.6
    return images


def test_an_edge_map_survives_randomisation_and_grad_cam_of_a_trained_like_model_does_not(tmp_path: Path) -> None:
    manifest_path = write_model(tmp_path, cam_layer="features.conv3")
    loaded = ModelRegistry(tmp_path).load("tiny")
    images, labels = small_images(), [0, 1, 2, 3] * 2
    survivor = cascade(loaded.module, edges_regardless_of_weights, images, labels)
    assert [s.layer for s in survivor] == list(reversed(randomisable_layers(loaded.module)))
    assert all(s.signed[0] == s.absolute[0] == 1.0 for s in survivor)
    steps = cascade(loaded.module, gradcam_explainer("features.conv3"), images, labels)
    assert len(steps) == len(survivor) >= 3
    last = steps[-1]
    assert abs(last.signed[0]) < 0.5 and abs(last.absolute[0]) < 0.5  # the maps fall apart
    assert last.signed[1] <= last.signed[0] <= last.signed[2]  # a spread, not one number
    assert manifest_path.is_file()


def _result(steps: tuple, manifest_sha: str) -> SanityResult:
    return SanityResult("tiny", "0.1", manifest_sha, "gradcam", MIN_IMAGES_PER_LABEL, 0.5, steps)


def test_models_verify_refuses_a_model_whose_maps_survive_unless_its_manifest_records_it(tmp_path: Path) -> None:
    write_model(tmp_path)
    registry = ModelRegistry(tmp_path)
    manifest = registry.manifest("tiny")
    loaded = registry.load("tiny")
    images, labels = small_images(), [0, 1, 2, 3] * 2
    steps = tuple(cascade(loaded.module, edges_regardless_of_weights, images, labels))
    cache_path(manifest).write_text(_result(steps, manifest.sha256).to_json())
    assert cached_result(manifest) is not None and not cached_result(manifest).passed  # type: ignore[union-attr]
    with pytest.raises(ModelError, match=r"fails the sanity check.*accepted_failure"):
        verify_models(registry)
    accepted = dataclasses.replace(manifest, sanity_accepted_failure="edge detector, research use")
    assert refusal(accepted, _result(steps, manifest.sha256)) is None


def test_the_manifest_can_record_an_accepted_failure(tmp_path: Path) -> None:
    write_model(tmp_path, extra='[sanity]\naccepted_failure = "known: maps follow edges"')
    registry = ModelRegistry(tmp_path)
    assert registry.manifest("tiny").sanity_accepted_failure == "known: maps follow edges"
    loaded = registry.load("tiny")
    steps = tuple(cascade(loaded.module, edges_regardless_of_weights, small_images(), [0, 1, 2, 3] * 2))
    cache_path(loaded.manifest).write_text(_result(steps, loaded.manifest.sha256).to_json())
    [line] = verify_models(registry)
    assert "FAILED, accepted: known: maps follow edges" in line


def test_a_cache_of_other_weights_is_not_used_and_too_few_images_are_refused(tmp_path: Path) -> None:
    write_model(tmp_path)
    loaded = ModelRegistry(tmp_path).load("tiny")
    steps = tuple(cascade(loaded.module, edges_regardless_of_weights, small_images(2), [0, 1]))
    cache_path(loaded.manifest).write_text(_result(steps, "0" * 64).to_json())
    assert cached_result(loaded.manifest) is None
    with pytest.raises(ModelError, match="at least 40 held-out images per label"):
        check_model(loaded.manifest, loaded.module, lambda: (small_images(8), [0, 1, 2, 3] * 2))


def test_the_demo_model_passes_from_its_shipped_cache() -> None:
    """The demo model's result ships next to its weights: verify reads it, computes nothing."""
    registry = ModelRegistry(REPO / "models")
    manifest = registry.manifest("demo-cxr")
    result = cached_result(manifest)
    assert result is not None and result.passed and result.images_per_label >= MIN_IMAGES_PER_LABEL
    assert result.steps[0].layer.startswith("classifier") and result.steps[-1].layer == "features.conv1"
    [line] = [entry for entry in verify_models(registry) if entry.startswith("sanity demo-cxr")]
    assert ": passed" in line

"""LIME: the ridge matches scikit-learn's on the same samples, a fixed seed repeats, maps localise."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.linear_model import Ridge

from dicom_node.explain.lime import kernel_weights, lime, slic
from dicom_node.inference.architectures import BUILDERS
from dicom_node.phantoms import render


def test_slic_gives_compact_superpixels_that_follow_edges() -> None:
    image = np.zeros((64, 64), dtype=np.float32)
    image[:, 32:] = 1.0
    segments = slic(image, segments=16)
    assert 15 <= segments.max() + 1 <= 17
    for label in np.unique(segments):  # no superpixel straddles the edge
        assert len(np.unique(image[segments == label])) == 1


def assert_connected_and_counted(segments: np.ndarray, requested: int) -> None:
    labels = np.unique(segments)
    assert np.array_equal(labels, np.arange(len(labels)))  # numbered 0..n-1, as LIME indexes them
    assert abs(len(labels) - requested) <= 0.1 * requested, (len(labels), requested)
    pieces = [ndimage.label(segments == label)[1] for label in labels]
    assert max(pieces) == 1, f"{sum(p > 1 for p in pieces)} disconnected segments"


@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("requested", [16, 64, 128])
def test_slic_segments_are_connected_and_as_many_as_asked_on_phantoms(size: int, requested: int) -> None:
    for seed in (1, 2):
        image = render(seed, size, findings={"nodule": True, "consolidation": True}).image
        assert_connected_and_counted(slic(image, segments=requested), requested)


def test_slic_segments_are_connected_and_as_many_as_asked_on_other_images() -> None:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 96 * 80).reshape(96, 80)
    images = [rng.random((128, 128)), np.zeros((128, 128)), ramp, rng.random((96, 80)) * 0.1 + ramp * 0.9]
    for image in images:
        for requested in (16, 64, 128):
            assert_connected_and_counted(slic(image, segments=requested), requested)


def test_coefficients_equal_a_ridge_fit_on_the_same_samples() -> None:
    torch.manual_seed(0)
    model = BUILDERS["small_cnn"](4, 1).eval()
    image = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(3))
    segments = slic(image[0].numpy(), segments=25)
    result = lime(model, image, segments, samples=300, seed=7, batch_size=64)
    assert result.patterns[0].all() and result.coefficients.shape == (4, segments.max() + 1)
    for label in range(4):
        reference = Ridge(alpha=1.0, fit_intercept=True).fit(
            result.patterns, result.probabilities[:, label], sample_weight=result.weights)
        scale = np.abs(reference.coef_).max()
        np.testing.assert_allclose(result.coefficients[label], reference.coef_, atol=1e-4 * scale, rtol=1e-4)
        np.testing.assert_allclose(result.intercepts[label], reference.intercept_, atol=1e-6)


def test_kernel_is_limes() -> None:
    patterns = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    distance = np.array([0.0, 1 - 2 / (np.sqrt(2) * 2), 1 - 1 / 2])
    np.testing.assert_allclose(kernel_weights(patterns), np.sqrt(np.exp(-(distance**2) / 0.25**2)))


def test_a_fixed_seed_gives_identical_output() -> None:
    torch.manual_seed(0)
    model = BUILDERS["small_cnn"](4, 1).eval()
    image = torch.rand(1, 48, 48, generator=torch.Generator().manual_seed(1))
    segments = slic(image[0].numpy(), segments=16)
    first = lime(model, image, segments, samples=100, seed=5)
    second = lime(model, image, segments, samples=100, seed=5)
    assert np.array_equal(first.coefficients, second.coefficients)
    assert not np.array_equal(first.patterns, lime(model, image, segments, samples=100, seed=6).patterns)

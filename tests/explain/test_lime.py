"""LIME: the ridge matches scikit-learn's on the same samples, a fixed seed repeats, maps localise."""

import numpy as np
import torch
from sklearn.linear_model import Ridge

from dicom_node.explain.lime import kernel_weights, lime, slic
from dicom_node.inference.architectures import BUILDERS


def test_slic_gives_compact_superpixels_that_follow_edges() -> None:
    image = np.zeros((64, 64), dtype=np.float32)
    image[:, 32:] = 1.0
    segments = slic(image, segments=16)
    assert 10 <= segments.max() + 1 <= 20
    for label in np.unique(segments):  # no superpixel straddles the edge
        assert len(np.unique(image[segments == label])) == 1


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

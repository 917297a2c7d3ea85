"""Explanation quality figures on toy models whose right answer is known."""

import numpy as np
import pytest
import torch
from torch import nn

from dicom_node.explain.quality import (
    deletion_insertion,
    evaluate_explanation_quality,
    iou,
    pointing_game,
    random_map,
    rank_agreement,
    sobel_map,
    sparseness,
    stability,
)


class SquareDetector(nn.Module):
    """Its only output is the brightness of one square of the image, minus the rest's."""

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        weight = torch.full((size, size), -1.0 / (size * size))
        weight[8:16, 8:16] = 1.0 / 64
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (20 * (x[:, 0] * self.weight).sum(dim=(1, 2)) - 5)[:, None]


def square_image() -> torch.Tensor:
    image = torch.full((1, 32, 32), 0.2)
    image[0, 8:16, 8:16] = 0.9
    image[0, 24:28, 2:30] = 0.9  # a bright decoy the model ignores
    return image


def test_a_faithful_map_beats_random_and_edge_maps_on_deletion_and_insertion() -> None:
    image = square_image()
    faithful = torch.zeros(32, 32)
    faithful[8:16, 8:16] = 1.0
    maps = torch.stack([faithful, random_map(32, 32, seed=1), sobel_map(image)])
    deletion, insertion = deletion_insertion(SquareDetector(), image, maps, label=0, steps=16)
    assert deletion.shape == insertion.shape == (3,)
    assert deletion[0] < deletion[1] and deletion[0] < deletion[2]
    assert insertion[0] > insertion[1] and insertion[0] > insertion[2]
    assert np.all((deletion >= 0) & (deletion <= 1) & (insertion >= 0) & (insertion <= 1))


def test_stability_is_one_for_a_fixed_map_and_lower_for_a_noise_driven_one() -> None:
    image = square_image()
    assert stability(lambda batch: batch[:, 0] * 0 + image[0], image) == pytest.approx(1.0)
    noisy = stability(lambda batch: batch[:, 0] - image[0], image)  # the map is the noise itself
    assert noisy < 0.2


def test_rank_agreement_sparseness_pointing_and_iou() -> None:
    a = np.arange(16.0).reshape(4, 4)
    assert rank_agreement(a, a) == pytest.approx(1.0)
    assert rank_agreement(a, -a) == pytest.approx(-1.0)
    assert sparseness(np.ones((8, 8))) == pytest.approx(0.0, abs=1e-9)
    one_hot = np.zeros((8, 8))
    one_hot[3, 3] = 1
    assert sparseness(one_hot) > 0.95
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:5, 2:5] = True
    assert pointing_game(one_hot, mask) and iou(mask.astype(float), mask) == 1.0
    assert not pointing_game(np.roll(one_hot, 4, axis=1), mask)
    figures = evaluate_explanation_quality(mask.astype(float), mask, perturbed=[mask.astype(float)])
    assert figures == {"iou": 1.0, "hit": 1.0, "sparseness": figures["sparseness"], "stability": 1.0}

"""The closed list of architectures a manifest may name, built without any download.

torchvision models are always built with ``weights=None``: the node never fetches weights; a
manifest points at a file the hospital has.
"""

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


class SmallCNN(nn.Module):
    """The seed article's classifier: three 3x3 conv layers (32/64/128) with max-pooling, then two
    linear layers; grayscale in, one logit per label out. Global average and global max pooling
    side by side before the head make it take any input size and keep a small finding (a nodule)
    from being averaged away. ``features.relu3`` is its CAM layer."""

    def __init__(self, num_labels: int, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential()
        channels = [in_channels, 32, 64, 128]
        for i in range(3):
            self.features.add_module(f"conv{i + 1}", nn.Conv2d(channels[i], channels[i + 1], 3, padding=1))
            self.features.add_module(f"norm{i + 1}", nn.BatchNorm2d(channels[i + 1]))
            self.features.add_module(f"relu{i + 1}", nn.ReLU())
            if i < 2:
                self.features.add_module(f"pool{i + 1}", nn.MaxPool2d(2))
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, num_labels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        return self.classifier(torch.cat([self.avg_pool(features), self.max_pool(features)], dim=1))


def _torchvision(name: str) -> Callable[[int, int], nn.Module]:
    def build(num_labels: int, in_channels: int) -> nn.Module:
        import torchvision

        if in_channels != 3:
            raise ValueError(f"{name} takes 3 input channels (grayscale is replicated); set channels = 3")
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_labels)
        return model

    return build


BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "small_cnn": lambda num_labels, in_channels: SmallCNN(num_labels, in_channels),
    **{name: _torchvision(name) for name in ("densenet121", "resnet18", "resnet50", "efficientnet_b0")},
}


def build(architecture: str, num_labels: int, in_channels: int, weights: Path) -> nn.Module:
    """The model of ``architecture`` with the weights of ``weights`` loaded (on the CPU).

    A state dict must match the architecture exactly (``strict=True``); a TorchScript file is
    loaded as it is. Weights are loaded with ``weights_only=True``: a weights file cannot run code.

    Raises
    ------
    ValueError
        If the file does not fit the architecture, naming what does not fit.
    """
    if architecture == "torchscript":
        try:
            with warnings.catch_warnings():  # torch deprecates TorchScript; hospitals still have such files
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(weights), map_location="cpu")
        except RuntimeError as exc:
            raise ValueError(f"not a TorchScript file: {str(exc).splitlines()[0]}") from None
    model = BUILDERS[architecture](num_labels, in_channels)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or damaged files
        raise ValueError(f"cannot read a state dict: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict, found {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ValueError(f"weights do not fit {architecture} with {num_labels} labels: {first}") from None
    return model

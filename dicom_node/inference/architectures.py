"""The closed list of architectures a manifest may name, built without any download.

torchvision models are always built with ``weights=None``: the node never fetches weights; a
manifest points at a file the hospital has.
"""

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def conv_blocks(in_channels: int, widths: tuple[int, ...], pools: int) -> nn.Sequential:
    """3x3 conv, batch norm and ReLU per width (``conv1``, ``norm1``, ``relu1``, ...), with 2x2
    max-pooling (``pool1``, ...) after the first ``pools`` blocks."""
    blocks = nn.Sequential()
    channels = [in_channels, *widths]
    for i in range(len(widths)):
        blocks.add_module(f"conv{i + 1}", nn.Conv2d(channels[i], channels[i + 1], 3, padding=1))
        blocks.add_module(f"norm{i + 1}", nn.BatchNorm2d(channels[i + 1]))
        blocks.add_module(f"relu{i + 1}", nn.ReLU())
        if i < pools:
            blocks.add_module(f"pool{i + 1}", nn.MaxPool2d(2))
    return blocks


class PlainCNN(nn.Module):
    """3x3 conv blocks (conv, batch norm, ReLU; 2x2 max-pooling after the first ``pools``), then
    global average and global max pooling side by side and two linear layers; grayscale in, one
    logit per label out. The two poolings make it take any input size and keep a small finding
    (a nodule) from being averaged away. Modules are named ``features.conv1``, ``features.relu1``
    and so on; the last ``features.reluN`` is the CAM layer."""

    def __init__(self, num_labels: int, in_channels: int, widths: tuple[int, ...], pools: int,
                 hidden: int) -> None:
        super().__init__()
        self.features = conv_blocks(in_channels, widths, pools)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * widths[-1], hidden), nn.ReLU(), nn.Linear(hidden, num_labels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(x)[0]

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the last feature module's output averaged over its grid, (batch,
        channels, 1, 1): the input-distribution gate reads that mean (see
        :class:`dicom_node.inference.gate.FeatureCapture`) instead of computing it again."""
        features = self.features(x)
        mean = self.avg_pool(features)
        return self.classifier(torch.cat([mean, self.max_pool(features)], dim=1)), mean

    def pooled_layer(self, layer_name: str) -> str | None:
        """``avg_pool`` when ``layer_name`` is the last feature module, whose output it averages
        over the grid (:meth:`forward_pooled`); else None."""
        last = next(reversed(self.features._modules))
        return "avg_pool" if layer_name == f"features.{last}" else None


class SmallCNN(PlainCNN):
    """The seed article's classifier: three conv blocks of 32/64/128 channels, a 256 -> 64 -> labels
    head. ``features.relu3`` (a quarter of the input side) is its CAM layer. About 156 M
    multiply-adds an image at 128 px."""

    def __init__(self, num_labels: int, in_channels: int = 1) -> None:
        super().__init__(num_labels, in_channels, (32, 64, 128), 2, 64)


class CompactCNN(PlainCNN):
    """The demo model's network: four conv blocks of 8/16/32/64 channels, max-pooling after the
    first two, a 128 -> 32 -> labels head. About 30 M multiply-adds an image at 128 px (a fifth of
    :class:`SmallCNN`), so that 1000 LIME samples and the quality figures fit in a clinical time
    budget on two CPU cores. ``features.relu4`` (a quarter of the input side, as fine as
    :class:`SmallCNN`'s) is its CAM layer."""

    def __init__(self, num_labels: int, in_channels: int = 1) -> None:
        super().__init__(num_labels, in_channels, (8, 16, 32, 64), 2, 32)


def _torchvision(name: str) -> Callable[[int, int], nn.Module]:
    def build(num_labels: int, in_channels: int) -> nn.Module:
        import torchvision

        if in_channels != 3:
            raise ValueError(f"{name} takes 3 input channels (grayscale is replicated); set channels = 3")
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_labels)
        return model

    return build


def _attention_unet(num_labels: int, in_channels: int, *, spatial_dims: int, channels: Sequence[int],
                    strides: Sequence[int]) -> nn.Module:
    """MONAI's attention U-Net (Oktay et al. 2018): one output channel (a logit map) per label.
    Its attention gates are the ``AttentionBlock`` modules; their ``psi`` outputs are the
    coefficients (:mod:`dicom_node.explain.volume`)."""
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_labels,
                         channels=tuple(channels), strides=tuple(strides))


#: Builders by name: ``(num_labels, in_channels, **parameters)``; only ``attention_unet`` takes
#: parameters (the manifest's ``[network]``).
def _protopnet(num_labels: int, in_channels: int) -> nn.Module:
    from dicom_node.inference.protopnet import ProtoPNet  # it builds on conv_blocks above

    return ProtoPNet(num_labels, in_channels)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": lambda num_labels, in_channels: SmallCNN(num_labels, in_channels),
    "compact_cnn": lambda num_labels, in_channels: CompactCNN(num_labels, in_channels),
    "protopnet": lambda num_labels, in_channels: _protopnet(num_labels, in_channels),
    **{name: _torchvision(name) for name in ("densenet121", "resnet18", "resnet50", "efficientnet_b0")},
    "attention_unet": _attention_unet,
}


def build(architecture: str, num_labels: int, in_channels: int, weights: Path,
          parameters: Mapping[str, Any] | None = None) -> nn.Module:
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
    model = BUILDERS[architecture](num_labels, in_channels, **(parameters or {}))
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

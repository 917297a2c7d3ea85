"""The CAM family for every label of a multi-label model from one forward and one batched backward.

:class:`CamMethod` runs the algorithm: a forward pass with a hook on the target layer that keeps
the layer's output (a clone goes on through the model, so an in-place operation after the layer
cannot change what is explained: the maps are the same on every device), then one
vector-Jacobian product batched over the labels (``is_grads_batched``) gives every label's
gradient at once. Each gradient method is a small subclass that turns activations and gradients
into maps; plain CAM needs no backward. Hooks are registered per call and always released; the
model is not switched to eval mode, and no layer is replaced.

As published (and as pytorch-grad-cam computes them), the maps shown are the ReLU of the
weighted sum on the layer's grid, upsampled bilinearly to the input: upsampling first would let
negative evidence bleed into neighbouring positive cells. The signed maps before the ReLU stay
available (:attr:`CamMaps.signed_layer_maps`, :meth:`CamMaps.signed_maps`) for figures that need
them. No min-max scaling: rendering chooses how to show the maps.

A layer is explained as the model's head reads it. torchvision's DenseNet applies
``F.relu(inplace=True)`` to ``features`` (whose last module is ``norm5``) in its ``forward``,
outside any module: for ``features`` or ``features.norm5`` of a DenseNet the activations are
``relu(norm5)``, what its classifier pools, and the forward runs without that second ReLU (it
would zero the gradient where the activation is 0), so plain CAM equals Grad-CAM times h*w there
as on a ResNet, on every device.
"""

import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CamMaps:
    """Maps for a batch: ``maps[b, l]`` for input ``b`` and label ``labels[l]``, on the input grid."""

    method: str
    layer: str  # as explained, e.g. "relu(features.norm5)" for a DenseNet
    labels: tuple[int, ...]
    maps: torch.Tensor  # (batch, labels, height, width): ReLU on the layer's grid, then upsampled; float32
    layer_maps: torch.Tensor  # (batch, labels, h, w) on the layer's grid: the ReLU of signed_layer_maps
    signed_layer_maps: torch.Tensor  # (batch, labels, h, w) on the layer's grid, signed, before any ReLU
    logits: torch.Tensor  # (batch, all outputs), float32

    def signed_maps(self) -> torch.Tensor:
        """The signed maps before the ReLU, upsampled like :attr:`maps` to the input grid."""
        return upsample(self.signed_layer_maps, self.maps.shape[-2:])


def upsample(layer_maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, L, h, w) maps to (B, L, *size), bilinear with pixel centres aligned (as OpenCV's resize,
    which pytorch-grad-cam uses), on the maps' device."""
    with torch.no_grad():
        return F.interpolate(layer_maps, size=tuple(size), mode="bilinear", align_corners=False)


class CamMethod(ABC):
    """Base class: class activation maps of ``layer`` for many labels at once.

    Safe to call from several threads on one shared model: a call's hook only captures the
    forward pass of the thread that registered it.
    """

    name = "cam-base"
    needs_gradients = True

    def __init__(self, layer: str) -> None:
        self.layer = layer

    @abstractmethod
    def layer_maps(
        self, activations: torch.Tensor, logits: torch.Tensor, labels: list[int], model: nn.Module
    ) -> torch.Tensor:
        """(B, K, h, w) activations and (B, outputs) logits -> (B, L, h, w) signed maps on the layer's
        grid."""

    def __call__(self, model: nn.Module, inputs: torch.Tensor, labels: Sequence[int]) -> CamMaps:
        """Maps of ``labels`` for every input: the ReLU on the layer's grid, upsampled (bilinear, on
        the device) to the input size."""
        reading = _head_reads(model, self.layer)
        activations, logits = _forward(model, self.layer, reading, inputs, self.needs_gradients)
        signed = self.layer_maps(activations, logits, list(labels), model)
        shown = signed.clamp(min=0)
        layer = self.layer if reading is None else f"relu({self.layer})"
        return CamMaps(self.name, layer, tuple(labels), upsample(shown, inputs.shape[-2:]), shown, signed,
                       logits.detach().float())


Activation = Callable[[torch.Tensor], torch.Tensor]
Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Reading:
    """How a model's head reads a layer when its forward applies a function outside any module."""

    activation: Activation  # what the forward applies to the layer's output
    forward: Forward  # the model's forward without applying it again (the hook already has)


def _densenet_forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """torchvision's ``DenseNet.forward`` without its ``F.relu(features, inplace=True)``: applied a
    second time, that ReLU would zero the gradient wherever the activation is 0, and Grad-CAM's
    weights would no longer be the classifier's."""
    features, classifier = cast(nn.Module, model.features), cast(nn.Module, model.classifier)
    return classifier(torch.flatten(F.adaptive_avg_pool2d(features(inputs), (1, 1)), 1))


def _head_reads(model: nn.Module, name: str) -> _Reading | None:
    """How the model's head reads layer ``name``, when that is not the layer's output as it is."""
    # torchvision is imported lazily (architectures.py): a model built from it has imported it.
    densenet = getattr(sys.modules.get("torchvision.models"), "DenseNet", None)
    if (densenet is not None and isinstance(model, densenet) and type(model).forward is densenet.forward
            and name in ("features", "features.norm5")):
        return _Reading(F.relu, _densenet_forward)
    return None


def _forward(
    model: nn.Module, name: str, reading: _Reading | None, inputs: torch.Tensor, gradients: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass keeping layer ``name``'s output as the head reads it (a clone goes on through
    the model, so what follows may work in place); with ``gradients``, the graph stays for a
    backward pass."""
    layer = dict(model.named_modules()).get(name)
    if layer is None:
        raise ValueError(f"model has no layer {name!r}")
    captured: list[torch.Tensor] = []
    owner = threading.get_ident()

    def keep(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != owner:
            return None  # another thread's pass through the shared model
        kept = output if reading is None else reading.activation(output)
        captured.append(kept)
        return kept.clone()  # what follows may work in place; ours stays untouched

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad() if gradients else torch.no_grad():
            x = inputs.detach().requires_grad_(True) if gradients else inputs
            logits = model(x) if reading is None else reading.forward(model, x)
    finally:
        handle.remove()
    return captured[-1], logits


class GradientCAM(CamMethod):
    """Gradient-weighted maps: one vector-Jacobian product batched over the labels gives every
    label's gradient at the layer; a subclass turns activations and gradients into maps."""

    @abstractmethod
    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """(L, B, K, h, w) activations and gradients -> (L, B, h, w) maps."""

    def layer_maps(
        self, activations: torch.Tensor, logits: torch.Tensor, labels: list[int], model: nn.Module
    ) -> torch.Tensor:
        selected = logits[:, labels]  # (B, L)
        count = len(labels)
        seeds = torch.eye(count, device=logits.device, dtype=logits.dtype)[:, None, :].expand(
            count, logits.shape[0], count
        )
        (gradients,) = torch.autograd.grad(selected, activations, grad_outputs=seeds, is_grads_batched=True)
        with torch.no_grad():
            expanded = activations.detach().float().unsqueeze(0).expand(count, *activations.shape)
            return self.combine(expanded, gradients.float()).permute(1, 0, 2, 3)  # (B, L, h, w)


class GradCAM(GradientCAM):
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by their spatially averaged gradient."""

    name = "gradcam"

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        weights = gradients.mean(dim=(-2, -1), keepdim=True)
        return (weights * activations).sum(dim=2)


class GradCAMPlusPlus(GradientCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018), with the usual exponential-output approximation."""

    name = "gradcampp"

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        squared = gradients.pow(2)
        cubed = squared * gradients
        sums = activations.sum(dim=(-2, -1), keepdim=True)
        alpha = squared / (2 * squared + sums * cubed + 1e-6)  # eps as in pytorch-grad-cam
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        weights = (gradients.clamp(min=0) * alpha).sum(dim=(-2, -1), keepdim=True)
        return (weights * activations).sum(dim=2)


class HiResCAM(GradientCAM):
    """HiResCAM (Draelos and Carin 2020): gradient times activation, element by element."""

    name = "hirescam"

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (gradients * activations).sum(dim=2)


class CAM(CamMethod):
    """Class activation maps (Zhou et al. 2016) in closed form, without a backward pass: for a head
    that is global average pooling then one linear layer, label ``l``'s map is ``sum_c W[l, c] A_c``.

    The head is not read from the architecture's name: the forward pass's logits must equal the
    linear layer applied to the pooled activations (within 1e-4), else the model's head is of
    another kind and a ``ValueError`` says to use a gradient method.
    """

    name = "cam"
    needs_gradients = False

    def layer_maps(
        self, activations: torch.Tensor, logits: torch.Tensor, labels: list[int], model: nn.Module
    ) -> torch.Tensor:
        activations, logits = activations.float(), logits.float()
        head = _linear_head(model, activations, logits)
        weights = head.weight.detach().float()[labels]  # (L, K)
        with torch.no_grad():
            return torch.einsum("lk,bkhw->blhw", weights, activations)


def _linear_head(model: nn.Module, activations: torch.Tensor, logits: torch.Tensor) -> nn.Linear:
    """The model's last linear layer, if the logits are it applied to the pooled activations."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    channels = activations.shape[1]
    if linears and linears[-1].in_features == channels and linears[-1].out_features == logits.shape[1]:
        head = linears[-1]
        with torch.no_grad():
            expected = F.linear(
                activations.mean(dim=(-2, -1)),
                head.weight.float(),
                None if head.bias is None else head.bias.float(),
            )
        if torch.allclose(expected, logits, rtol=1e-4, atol=1e-4 * float(logits.abs().max()) + 1e-6):
            return head
    raise ValueError(
        "plain CAM needs a head of global average pooling and one linear layer after the "
        "CAM layer, and this model's is not; use gradcam, gradcampp or hirescam"
    )


METHODS: dict[str, type[CamMethod]] = {m.name: m for m in (GradCAM, GradCAMPlusPlus, HiResCAM, CAM)}

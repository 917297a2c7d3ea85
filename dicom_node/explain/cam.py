"""The CAM family for every label of a multi-label model from one forward and one batched backward.

:class:`CamMethod` runs the algorithm: a forward pass with a hook on the target layer that keeps
the layer's output (a clone goes on through the model, so an in-place operation after the layer,
such as torchvision DenseNet's ReLU after ``features.norm5``, cannot change what is explained:
the maps are the same on every device), then one vector-Jacobian product batched over the
labels (``is_grads_batched``) gives every label's gradient at once. Each gradient method is a
small subclass that turns activations and gradients into maps; plain CAM needs no backward.
Hooks are registered per call and always released; the model is not switched to eval mode, and
no layer is replaced.

Maps are signed and raw (no ReLU, no min-max): rendering chooses how to show them.
"""

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CamMaps:
    """Maps for a batch: ``maps[b, l]`` for input ``b`` and label ``labels[l]``, on the input grid."""

    method: str
    layer: str
    labels: tuple[int, ...]
    maps: torch.Tensor  # (batch, labels, height, width) on the input grid, float32, signed, unscaled
    layer_maps: torch.Tensor  # (batch, labels, h, w) on the layer's grid, before upsampling
    logits: torch.Tensor  # (batch, all outputs), float32


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
        """(B, K, h, w) activations and (B, outputs) logits -> (B, L, h, w) maps on the layer's grid."""

    def __call__(self, model: nn.Module, inputs: torch.Tensor, labels: Sequence[int]) -> CamMaps:
        """Maps of ``labels`` for every input, upsampled (bilinear, on the device) to the input size."""
        activations, logits = _forward(model, self.layer, inputs, self.needs_gradients)
        layer_maps = self.layer_maps(activations, logits, list(labels), model)
        with torch.no_grad():
            maps = F.interpolate(layer_maps, size=inputs.shape[-2:], mode="bilinear", align_corners=False)
        return CamMaps(self.name, self.layer, tuple(labels), maps, layer_maps, logits.detach().float())


def _forward(
    model: nn.Module, name: str, inputs: torch.Tensor, gradients: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass keeping layer ``name``'s output (a clone goes on through the model, so what
    follows may work in place); with ``gradients``, the graph stays for a backward pass."""
    layer = dict(model.named_modules()).get(name)
    if layer is None:
        raise ValueError(f"model has no layer {name!r}")
    captured: list[torch.Tensor] = []
    owner = threading.get_ident()

    def keep(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != owner:
            return None  # another thread's pass through the shared model
        captured.append(output)
        return output.clone()  # what follows may work in place; ours stays untouched

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad() if gradients else torch.no_grad():
            logits = model(inputs.detach().requires_grad_(True) if gradients else inputs)
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

"""Explanations of a segmentation model on a volume, as maps on the source grid.

- ``attention``: the coefficients of each attention gate of an attention U-Net (the sigmoid
  output of MONAI ``AttentionBlock.psi``, in [0, 1]): one map per gate, upsampled from the
  gate's grid to the model grid (trilinear; bilinear per slice for a 2D network);
- ``seggradcam``: Seg-Grad-CAM (Vinogradova et al. 2020), Grad-CAM of the mean logit of a
  label's channel over its predicted mask on the model grid, at the manifest's ``cam_layer``:
  ReLU on the layer's grid, then upsampled to the model grid.

Both stay on the model grid; a slice of the source grid is made when an overlay shows it
(:meth:`VolumeMap.source_slice`: the inverse of the volume's grid map, linear, for that slice
alone), since at most a few slices per map are shown. The attention gates are run once for all
labels. Hooks live for one call and are removed in ``finally``; the model is not switched
between train and eval mode.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dicom_node.inference.registry import LoadedModel
from dicom_node.inference.segment import VolumeSegmentation, as_batch, from_batch
from dicom_node.inference.volume import GridMap, back_slice

#: The explanation methods of segmentation models (a pipeline's ``explain``).
VOLUME_METHODS = ("attention", "seggradcam")


@dataclass(frozen=True)
class VolumeMap:
    """One explanation map of a label on the model grid (slices, rows, columns), non-negative,
    with provenance and the map to the source grid."""

    label: str
    method: str  # one of VOLUME_METHODS
    layer: str  # the attention gate's psi module, or the Seg-Grad-CAM layer
    array: np.ndarray
    mapping: GridMap

    def source_slice(self, k: int) -> np.ndarray:
        """Slice ``k`` of the source grid (R, C), float32, mapped back linearly."""
        return back_slice(self.mapping, self.array, k)


def _to_grid(maps: torch.Tensor, shape: tuple[int, int, int], spatial_dims: int) -> np.ndarray:
    """(batch, 1, ...) maps of a network layer as (slices, rows, columns) on the model grid."""
    if spatial_dims == 3:
        grid = F.interpolate(maps.float(), size=shape, mode="trilinear", align_corners=False)
    else:
        grid = F.interpolate(maps.float(), size=shape[1:], mode="bilinear", align_corners=False)
    return np.asarray(from_batch(grid, spatial_dims)[0].detach().cpu().numpy(), dtype=np.float32)


def attention_gates(module: nn.Module) -> list[str]:
    """Names of the ``psi`` modules of the model's attention gates, outermost first."""
    from monai.networks.nets.attentionunet import AttentionBlock  # loaded with the model already

    return [f"{name}.psi" for name, child in module.named_modules() if isinstance(child, AttentionBlock)]


def attention_maps(loaded: LoadedModel, result: VolumeSegmentation) -> dict[str, np.ndarray]:
    """Each gate's coefficients on the model grid, by gate (``psi`` module name)."""
    assert loaded.manifest.network is not None
    dims = loaded.manifest.network.spatial_dims
    modules = dict(loaded.module.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, output, name=name: captured.__setitem__(name, output.detach()))
        for name in attention_gates(loaded.module)]
    try:
        with torch.inference_mode():
            loaded.module(as_batch(torch.from_numpy(result.model_input).to(loaded.device), dims))
    finally:
        for handle in handles:
            handle.remove()
    return {name: _to_grid(value, result.mapping.model_shape, dims) for name, value in captured.items()}


def seg_gradcam(loaded: LoadedModel, result: VolumeSegmentation, label: str) -> np.ndarray | None:
    """Seg-Grad-CAM of ``label`` on the model grid, or None when its model-grid mask is empty."""
    manifest = loaded.manifest
    assert manifest.network is not None
    channel = manifest.label_names.index(label)
    target = torch.from_numpy(result.model_masks[channel]).to(loaded.device)
    if not bool(target.any()):
        return None
    dims = manifest.network.spatial_dims
    captured: list[torch.Tensor] = []

    def keep(_m: nn.Module, _i: object, output: torch.Tensor) -> torch.Tensor:
        captured.append(output)
        return output.clone()  # an in-place operation after the layer cannot change what is kept

    handle = dict(loaded.module.named_modules())[manifest.cam_layer].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = as_batch(torch.from_numpy(result.model_input).to(loaded.device), dims)
            logits = from_batch(loaded.module(x), dims)[channel]
            score = logits[target].mean()
            activations = captured[0]
            gradients = torch.autograd.grad(score, activations)[0]
    finally:
        handle.remove()
    # one score for the whole volume: a 2D network's slices share the channel weights
    axes = (0, *range(2, gradients.ndim))
    weights = gradients.mean(dim=axes, keepdim=True)
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True)).detach()
    return _to_grid(cam, result.mapping.model_shape, dims)


def explain_volume(loaded: LoadedModel, result: VolumeSegmentation,
                   methods: Sequence[str]) -> list[VolumeMap]:
    """The ``methods``' maps of every label with a lesion, on the model grid; the attention maps
    (one forward pass for every label) are shared by the labels."""
    maps: list[VolumeMap] = []
    found = result.found()
    gates = attention_maps(loaded, result) if "attention" in methods and found else {}
    for label in found:
        if "seggradcam" in methods:
            cam = seg_gradcam(loaded, result, label)
            if cam is not None:
                maps.append(VolumeMap(label, "seggradcam", loaded.manifest.cam_layer, cam, result.mapping))
        maps += [VolumeMap(label, "attention", name, gate, result.mapping) for name, gate in gates.items()]
    return maps

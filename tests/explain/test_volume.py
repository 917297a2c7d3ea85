"""The explanation maps of a segmentation model checked against computations made here, apart
from the code under test: the attention coefficients are the ``psi`` outputs of MONAI's attention
gates in a forward pass run by hand, and Seg-Grad-CAM is Grad-CAM of the label's logit summed
over a given mask, with the gradient taken by ``backward`` on a hooked layer."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets.attentionunet import AttentionBlock

from dicom_node.explain.volume import attention_maps, explain_volume, seg_gradcam
from dicom_node.inference import InferenceRunner, ModelRegistry
from dicom_node.inference.registry import LoadedModel
from dicom_node.inference.segment import VolumeSegmentation
from dicom_node.inference.volume import assemble
from tests.test_pipeline_volume import GRID, mr_series, write_segmentation_model


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, VolumeSegmentation]:
    root = tmp_path_factory.mktemp("models")
    write_segmentation_model(root)
    runner = InferenceRunner(ModelRegistry(root), device="cpu")
    return runner.model("brain"), runner.segment("brain", assemble(mr_series()))


def _input(result: VolumeSegmentation) -> torch.Tensor:
    return torch.from_numpy(result.model_input)[None, None]


def test_attention_maps_are_the_gates_psi_outputs(segmented: tuple[LoadedModel, VolumeSegmentation]) -> None:
    loaded, result = segmented
    psi: dict[str, torch.Tensor] = {}
    gates = {name: module for name, module in loaded.module.named_modules() if isinstance(module, AttentionBlock)}
    handles = [module.psi.register_forward_hook(
        lambda _m, _i, output, name=name: psi.__setitem__(f"{name}.psi", output.detach().clone()))
        for name, module in gates.items()]
    try:
        with torch.no_grad():
            loaded.module(_input(result))
    finally:
        for handle in handles:
            handle.remove()
    maps = attention_maps(loaded, result)
    assert set(maps) == set(psi) and len(maps) == 2
    full = [name for name, value in psi.items() if tuple(value.shape[2:]) == GRID]
    assert full  # the outermost gate works on the model grid itself: compared as it is
    for name, value in psi.items():
        expected = value if name in full else F.interpolate(value, size=GRID, mode="trilinear", align_corners=False)
        np.testing.assert_allclose(maps[name], expected[0, 0].numpy(), atol=1e-6)
        assert maps[name].min() > 0.0 and maps[name].max() < 1.0  # sigmoid coefficients


def test_seg_grad_cam_equals_grad_cam_of_the_masked_logit(
    segmented: tuple[LoadedModel, VolumeSegmentation]
) -> None:
    loaded, result = segmented
    target = np.zeros(GRID, dtype=bool)
    target[3:6, 10:18, 12:20] = True
    cam = seg_gradcam(loaded, dataclasses.replace(result, model_masks=target[None]), "lesion")
    assert cam is not None
    kept: dict[str, torch.Tensor] = {}

    def keep(_m: torch.nn.Module, _i: object, output: torch.Tensor) -> torch.Tensor:
        kept["layer"] = output.clone()
        kept["layer"].retain_grad()
        return kept["layer"]

    layer = dict(loaded.module.named_modules())[loaded.manifest.cam_layer]
    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = loaded.module(_input(result).requires_grad_(True))[0, 0]
            logits[torch.from_numpy(target)].sum().backward()
    finally:
        handle.remove()
        loaded.module.zero_grad(set_to_none=True)
    activations, gradients = kept["layer"].detach(), kept["layer"].grad
    assert gradients is not None
    weights = gradients.mean(dim=(2, 3, 4), keepdim=True)  # spatial mean per channel
    expected = F.relu((weights * activations).sum(dim=1, keepdim=True))  # on the layer's grid
    expected = F.interpolate(expected, size=GRID, mode="trilinear", align_corners=False)[0, 0].numpy()
    assert expected.max() > 0
    assert np.corrcoef(cam.ravel(), expected.ravel())[0, 1] > 0.999
    np.testing.assert_allclose(cam / cam.max(), expected / expected.max(), atol=1e-5)


def test_an_empty_mask_has_no_seg_grad_cam_and_labels_share_the_attention_maps(
    segmented: tuple[LoadedModel, VolumeSegmentation]
) -> None:
    loaded, result = segmented
    empty = dataclasses.replace(result, model_masks=np.zeros((1, *GRID), dtype=bool))
    assert seg_gradcam(loaded, empty, "lesion") is None
    assert result.found() == ["lesion"]
    maps = explain_volume(loaded, result, ["attention"])
    assert [m.array.shape for m in maps] == [GRID, GRID]
    assert all(m.source_slice(0).shape == result.volume.array.shape[1:] for m in maps)

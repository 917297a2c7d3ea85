"""The CAM family against pytorch-grad-cam, and the robustness a node running for months needs."""

import gc
import threading

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM as RefGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as RefGradCAMPlusPlus
from pytorch_grad_cam import HiResCAM as RefHiResCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from dicom_node.explain import METHODS, GradCAM
from dicom_node.inference.architectures import BUILDERS

REFERENCES = {"gradcam": RefGradCAM, "gradcampp": RefGradCAMPlusPlus, "hirescam": RefHiResCAM}


def model_and_input(architecture: str, labels: int = 4, size: int = 64, channels: int = 1):
    torch.manual_seed(0)
    model = BUILDERS[architecture](labels, channels).eval()
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    return model, x


def reference_raw(method: str, model: nn.Module, layer: str, x: torch.Tensor, label: int) -> np.ndarray:
    """pytorch-grad-cam's signed map for one label, before its ReLU and min-max scaling."""
    module = dict(model.named_modules())[layer]
    with REFERENCES[method](model=model, target_layers=[module]) as cam:
        outputs = cam.activations_and_grads(x)
        targets = [ClassifierOutputTarget(label)] * len(x)
        model.zero_grad()
        sum(t(o) for t, o in zip(targets, outputs, strict=True)).backward()
        activations = cam.activations_and_grads.activations[-1].cpu().numpy()
        gradients = cam.activations_and_grads.gradients[-1].cpu().numpy()
        return cam.get_cam_image(x, module, targets, activations, gradients, eigen_smooth=False)


@pytest.mark.parametrize("method", sorted(REFERENCES))
@pytest.mark.parametrize(("architecture", "layer", "channels"),
                         [("small_cnn", "features.relu3", 1), ("resnet18", "layer4", 3)])
def test_every_label_equals_pytorch_grad_cam(method: str, architecture: str, layer: str, channels: int) -> None:
    model, x = model_and_input(architecture, channels=channels)
    ours = METHODS[method](layer)(model, x, [0, 1, 2, 3]).layer_maps
    for label in range(4):
        reference = torch.from_numpy(reference_raw(method, model, layer, x, label)).float()
        scale = reference.abs().max()
        assert torch.allclose(ours[:, label], reference, atol=1e-4 * float(scale), rtol=1e-4), (method, label)


def test_densenet_maps_do_not_depend_on_its_in_place_relu() -> None:
    model, x = model_and_input("densenet121", labels=14, size=64, channels=3)
    maps = GradCAM("features.norm5")(model, x, list(range(14)))
    # Grad-CAM by hand on norm5's output with the final ReLU made out of place:
    captured = {}
    model.features.norm5.register_forward_hook(lambda m, a, out: captured.update(a=out))
    features = model.features(x)
    logits = model.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(features), 1), 1))
    for label in (0, 13):
        (grads,) = torch.autograd.grad(logits[:, label].sum(), captured["a"], retain_graph=True)
        expected = (grads.mean(dim=(2, 3), keepdim=True) * captured["a"]).sum(1).detach()
        assert torch.allclose(maps.layer_maps[:, label], expected, atol=1e-5)
    assert torch.allclose(maps.logits, model(x).detach(), atol=1e-5)


def test_maps_are_upsampled_to_the_input_grid_and_the_model_is_left_alone() -> None:
    model, x = model_and_input("small_cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps = GradCAM("features.relu3")(model, x, [2])
    assert maps.maps.shape == (2, 1, 64, 64) and maps.layer_maps.shape == (2, 1, 16, 16)
    assert model.training  # not switched to eval behind the caller's back
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k)


def test_hooks_are_released_when_the_model_fails() -> None:
    model, _ = model_and_input("small_cnn")
    with pytest.raises(RuntimeError):
        GradCAM("features.relu3")(model, torch.randn(1, 3, 32, 32), [0])  # wrong channel count
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no layer"):
        GradCAM("features.conv9")(model, torch.randn(1, 1, 32, 32), [0])


def test_200_explanations_leave_no_hooks_and_no_growth() -> None:
    model, x = model_and_input("small_cnn")
    method = GradCAM("features.relu3")
    for _ in range(20):
        method(model, x, [0, 1, 2, 3])
    gc.collect()
    objects = len(gc.get_objects())
    for _ in range(200):
        method(model, x, [0, 1, 2, 3])
    gc.collect()
    assert not any(m._forward_hooks for m in model.modules())
    assert len(gc.get_objects()) - objects < 500  # no per-call leak of tensors or closures


def test_four_threads_on_one_shared_model_match_serial_runs() -> None:
    model, _ = model_and_input("small_cnn")
    inputs = [torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    method = GradCAM("features.relu3")
    serial = [method(model, x, [0, 1, 2, 3]).layer_maps for x in inputs]
    results: dict[int, torch.Tensor] = {}

    def work(indices: range) -> None:
        for i in indices:
            results[i] = method(model, inputs[i], [0, 1, 2, 3]).layer_maps

    threads = [threading.Thread(target=work, args=(range(t, 8, 4),)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(torch.allclose(results[i], serial[i], atol=1e-6) for i in range(8))


def test_plain_cam_is_closed_form_and_equals_grad_cam_times_the_grid_on_a_pooling_linear_head() -> None:
    from dicom_node.explain import CAM

    torch.manual_seed(3)
    model = BUILDERS["resnet18"](5, 3).eval()
    x = torch.randn(2, 3, 64, 64)
    cam = CAM("layer4")(model, x, [0, 3])
    grad = GradCAM("layer4")(model, x, [0, 3])
    h, w = cam.layer_maps.shape[-2:]
    # on global average pooling + linear, Grad-CAM's weights are W[l] / (h w): CAM is that times h w
    assert torch.allclose(cam.layer_maps, grad.layer_maps * h * w, rtol=1e-4, atol=1e-5)
    assert cam.maps.shape == (2, 2, 64, 64) and torch.equal(cam.logits, grad.logits)
    assert not any(m._forward_hooks for m in model.modules())  # hooks released


def test_plain_cam_refuses_a_head_it_cannot_explain() -> None:
    from dicom_node.explain import CAM

    model = BUILDERS["compact_cnn"](4, 1).eval()  # average + max pooling and a two-layer head
    with pytest.raises(ValueError, match="use gradcam"):
        CAM("features.relu4")(model, torch.randn(1, 1, 32, 32), [0])

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
def test_signed_maps_equal_pytorch_grad_cam_before_its_relu(
        method: str, architecture: str, layer: str, channels: int) -> None:
    model, x = model_and_input(architecture, channels=channels)
    ours = METHODS[method](layer)(model, x, [0, 1, 2, 3])
    assert torch.equal(ours.layer_maps, ours.signed_layer_maps.clamp(min=0))
    for label in range(4):
        reference = torch.from_numpy(reference_raw(method, model, layer, x, label)).float()
        scale = reference.abs().max()
        assert torch.allclose(ours.signed_layer_maps[:, label], reference, atol=1e-4 * float(scale), rtol=1e-4)


class DenseNetReadsRelu(nn.Module):
    """torchvision DenseNet's forward with its final ReLU as a module, out of place: a layer
    pytorch-grad-cam can hook where the classifier reads, the same on every device."""

    def __init__(self, densenet: nn.Module) -> None:
        super().__init__()
        self.features, self.relu, self.classifier = densenet.features, nn.ReLU(), densenet.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(self.relu(self.features(x)), 1)
        return self.classifier(torch.flatten(pooled, 1))


def normalised(maps: torch.Tensor) -> torch.Tensor:
    """Min-max per image, as pytorch-grad-cam scales its output (eps 1e-7 as there)."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    shifted = maps - low
    return shifted / (1e-7 + shifted.amax(dim=(-2, -1), keepdim=True))


def settle_batch_norm(model: nn.Module) -> None:
    """Batch-norm statistics of seeded random inputs. A random-weight EfficientNet with the initial
    statistics (mean 0, variance 1) gives maps of about 1e-13: float32 rounding noise, which
    min-max normalisation blows up to [0, 1] differently in any two implementations."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over the passes
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 96, 96, generator=torch.Generator().manual_seed(2)))
    model.eval()


# (architecture, the node's layer, pytorch-grad-cam's model and layer). DenseNet: the node hooks
# features.norm5 and explains relu(norm5); pytorch-grad-cam hooks the out-of-place ReLU of the same
# weights (hooked on norm5 itself it would see pre- or post-ReLU activations depending on the device).
PUBLISHED = [
    ("resnet18", "layer4", lambda m: (m, "layer4")),
    ("resnet50", "layer4", lambda m: (m, "layer4")),
    ("densenet121", "features.norm5", lambda m: (DenseNetReadsRelu(m), "relu")),
    ("efficientnet_b0", "features", lambda m: (m, "features")),
]


@pytest.mark.parametrize("method", sorted(REFERENCES))
@pytest.mark.parametrize(("architecture", "layer", "reference_side"), PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_every_label_matches_pytorch_grad_cam_after_normalisation(
        method: str, architecture: str, layer: str, reference_side) -> None:
    model, x = model_and_input(architecture, size=96, channels=3)
    if architecture == "efficientnet_b0":
        settle_batch_norm(model)
    reference_model, reference_layer = reference_side(model)
    assert torch.allclose(reference_model(x), model(x), atol=1e-5)
    ours = METHODS[method](layer)(model, x, [0, 1, 2, 3])
    assert ours.layer_maps.shape[-1] == 3 and ours.maps.shape[-2:] == x.shape[-2:]
    target = dict(reference_model.named_modules())[reference_layer]
    shown = 0
    with REFERENCES[method](model=reference_model, target_layers=[target]) as cam:
        for label in range(4):
            reference = torch.from_numpy(cam(x, targets=[ClassifierOutputTarget(label)] * len(x)))
            difference = (normalised(ours.maps[:, label]) - reference).abs().max()
            assert difference < 1e-4, (method, architecture, label, float(difference))
            shown += int((reference.amax(dim=(-2, -1)) > 0.99).sum())
    assert shown >= 4  # most maps compared are real, not the all-zero map of a wholly negative sum


def test_the_relu_comes_before_upsampling() -> None:
    model, x = model_and_input("resnet18", size=96, channels=3)
    maps = GradCAM("layer4")(model, x, [0, 1, 2, 3])
    signed = maps.signed_maps()
    assert (maps.maps >= 0).all() and (signed < 0).any()
    # Upsampling the signed map and clamping afterwards gives another map wherever a negative
    # cell borders a positive one; the node's map is the upsampled ReLU.
    assert not torch.allclose(maps.maps, signed.clamp(min=0), atol=1e-3)
    assert torch.allclose(maps.maps, nn.functional.interpolate(
        maps.signed_layer_maps.clamp(min=0), size=(96, 96), mode="bilinear", align_corners=False))


def test_densenet_is_explained_where_its_classifier_reads_whatever_its_in_place_relu_does() -> None:
    model, x = model_and_input("densenet121", labels=14, size=64, channels=3)
    for layer in ("features.norm5", "features"):
        maps = GradCAM(layer)(model, x, list(range(14)))
        assert maps.layer == f"relu({layer})"
        # Grad-CAM by hand on relu(norm5), with the final ReLU made out of place:
        activations = torch.relu(model.features(x))
        logits = model.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(activations, 1), 1))
        for label in (0, 13):
            (grads,) = torch.autograd.grad(logits[:, label].sum(), activations, retain_graph=True)
            expected = (grads.mean(dim=(2, 3), keepdim=True) * activations).sum(1).detach()
            assert torch.allclose(maps.signed_layer_maps[:, label], expected, atol=1e-5)
        assert torch.allclose(maps.logits, model(x).detach(), atol=1e-5)
    assert not any(m._forward_hooks for m in model.modules())


def test_maps_are_upsampled_to_the_input_grid_and_the_model_is_left_alone() -> None:
    model, x = model_and_input("small_cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps = GradCAM("features.relu3")(model, x, [2])
    assert maps.maps.shape == (2, 1, 64, 64) and maps.layer_maps.shape == (2, 1, 16, 16)
    assert maps.signed_maps().shape == (2, 1, 64, 64)
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


@pytest.mark.parametrize(("architecture", "layer"),
                         [("resnet18", "layer4"), ("densenet121", "features.norm5"), ("efficientnet_b0", "features")])
def test_plain_cam_is_closed_form_and_equals_grad_cam_times_the_grid_on_a_pooling_linear_head(
        architecture: str, layer: str) -> None:
    from dicom_node.explain import CAM

    torch.manual_seed(3)
    model = BUILDERS[architecture](5, 3).eval()
    x = torch.randn(2, 3, 64, 64)
    cam = CAM(layer)(model, x, [0, 3])
    grad = GradCAM(layer)(model, x, [0, 3])
    h, w = cam.layer_maps.shape[-2:]
    # on global average pooling + linear, Grad-CAM's weights are W[l] / (h w): CAM is that times h w
    scale = float(cam.signed_layer_maps.abs().max())
    assert torch.allclose(cam.signed_layer_maps, grad.signed_layer_maps * h * w, rtol=1e-4, atol=1e-5 * scale)
    assert cam.maps.shape == (2, 2, 64, 64) and torch.equal(cam.logits, grad.logits)
    assert not any(m._forward_hooks for m in model.modules())  # hooks released


def test_plain_cam_refuses_a_head_it_cannot_explain() -> None:
    from dicom_node.explain import CAM

    model = BUILDERS["compact_cnn"](4, 1).eval()  # average + max pooling and a two-layer head
    with pytest.raises(ValueError, match="use gradcam"):
        CAM("features.relu4")(model, torch.randn(1, 1, 32, 32), [0])

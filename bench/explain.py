"""Explanation speed: the node's methods against the libraries everyone uses, in one process.

CAM part: torchvision DenseNet121 (random weights, 14 labels, 224 px, ``features.norm5``), a
CheXNet-style model: the node's all-label Grad-CAM, Grad-CAM++, HiResCAM against pytorch-grad-cam
looping over the labels and captum's LayerGradCam looping over the labels; one forward and one
forward+backward as anchors. LIME part: the demo model (``models/demo-cxr``) on a phantom: the
node's LIME-1000 (all 4 labels, its SLIC superpixels and blurred background included) against
lime's LimeImageExplainer (batch 10 and 256, top 4 labels, its own quickshift segmentation) and
captum's Lime (perturbations_per_eval=256, one call per label, the node's superpixels); 1000
batched forward passes as the anchor. Same device for all; medians of ``--repeats`` runs after a
warm-up (the slow baselines run once).

Usage: ``.venv/bin/python bench/explain.py [--device cpu|cuda] [--repeats 5]``
"""

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import GradCAM as RefGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as RefGradCAMPlusPlus
from pytorch_grad_cam import HiResCAM as RefHiResCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from dicom_node.explain import METHODS, slic
from dicom_node.explain.lime import SEGMENTS, explain_lime
from dicom_node.inference import ModelRegistry, preprocess
from dicom_node.inference.architectures import BUILDERS
from dicom_node.phantoms import render, to_dataset

MODELS = Path(__file__).resolve().parents[1] / "models"

REFERENCES = {"gradcam": RefGradCAM, "gradcampp": RefGradCAMPlusPlus, "hirescam": RefHiResCAM}


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn`` after one warm-up call; ``repeats=0``: one call, no warm-up."""
    if repeats > 0:
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cam_rows(args: argparse.Namespace, device: torch.device) -> list[tuple[str, float]]:
    """The CAM part: DenseNet121, every label."""
    from captum.attr import LayerGradCam

    torch.manual_seed(0)
    model = BUILDERS["densenet121"](args.labels, 3).eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = list(range(args.labels))
    layer = "features.norm5"
    module = dict(model.named_modules())[layer]

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        model(x)[:, 0].sum().backward()
        model.zero_grad(set_to_none=True)

    rows = [("forward", timed(forward, args.repeats, device)),
            ("forward + backward (1 label)", timed(forward_backward, args.repeats, device))]
    for name in ("gradcam", "gradcampp", "hirescam"):
        ours = METHODS[name](layer)
        rows.append((f"node {name}, {args.labels} labels",
                     timed(lambda ours=ours: ours(model, x, labels), args.repeats, device)))
        with REFERENCES[name](model=model, target_layers=[module]) as cam:
            def loop(cam=cam) -> None:
                for label in labels:
                    cam(x, targets=[ClassifierOutputTarget(label)] * len(x))
            rows.append((f"pytorch-grad-cam {name}, loop over {args.labels} labels",
                         timed(loop, max(1, args.repeats // 2), device)))
    captum_cam = LayerGradCam(model, module)
    rows.append((f"captum LayerGradCam, loop over {args.labels} labels", timed(
        lambda: [captum_cam.attribute(x, target=label) for label in labels], max(1, args.repeats // 2),
        device)))
    return rows


def lime_rows(args: argparse.Namespace, device: torch.device) -> list[tuple[str, float]]:
    """The LIME part: the demo model on a phantom, 1000 samples."""
    from captum.attr import Lime as CaptumLime
    from lime.lime_image import LimeImageExplainer

    loaded = ModelRegistry(MODELS).load("demo-cxr", device)
    [item] = preprocess(to_dataset(render(7, 1024, findings={"nodule": True})), loaded.manifest.input)
    x = torch.from_numpy(item.array).to(device)
    segments = slic(item.array[0], segments=SEGMENTS)  # what the node's LIME uses, for captum's Lime
    model = loaded.module

    def classify(images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(images[..., :1].transpose(0, 3, 1, 2).astype(np.float32)).to(device)
        with torch.no_grad():
            return torch.sigmoid(model(batch)).cpu().numpy()

    batch_size = 256 if device.type == "cuda" else 8  # what the node's LIME uses on this device

    def forwards() -> None:
        with torch.no_grad():
            for start in range(0, 1000, batch_size):
                count = min(batch_size, 1000 - start)
                model(x[None].expand(count, -1, -1, -1).contiguous(memory_format=torch.channels_last))

    rgb = np.repeat(item.array[0][..., None], 3, axis=2).astype(np.double)
    rows = [("1000 forward passes (the node's LIME batches)", timed(forwards, 1, device)),
            ("node LIME-1000, 4 labels", timed(lambda: explain_lime(model, x, samples=1000), 1, device))]
    for batch in (10, 256):
        explainer = LimeImageExplainer(random_state=0)
        rows.append((f"lime LIME-1000, batch {batch}, top 4 labels", timed(
            lambda explainer=explainer, batch=batch: explainer.explain_instance(
                rgb, classify, top_labels=4, num_samples=1000, batch_size=batch, hide_color=None),
            0, device)))
    captum_lime = CaptumLime(model)
    mask = torch.from_numpy(segments).to(device)[None, None]
    rows.append(("captum Lime-1000, 256 per eval, 4 labels (one call each)", timed(
        lambda: [captum_lime.attribute(x[None], target=label, feature_mask=mask, n_samples=1000,
                                       perturbations_per_eval=256) for label in range(4)], 0, device)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--labels", type=int, default=14)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--no-lime", action="store_true", help="skip the LIME part")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = cam_rows(args, device)
    if not args.no_lime:
        rows += lime_rows(args, device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"CAM: densenet121, {args.labels} labels, {args.size} px, batch {args.batch}; "
          "LIME: demo-cxr, 128 px, 1000 samples")
    print(f"{'what':<60}{'median ms':>11}")
    for what, seconds in rows:
        print(f"{what:<60}{seconds * 1000:>11.1f}")
    t = dict(rows)
    for name in ("gradcam", "gradcampp", "hirescam"):
        ours = t[f"node {name}, {args.labels} labels"]
        print(f"{name}: {t[f'pytorch-grad-cam {name}, loop over {args.labels} labels'] / ours:.1f}x faster "
              f"than pytorch-grad-cam's loop; {ours / t['forward + backward (1 label)']:.2f}x one "
              "forward+backward")
    captum_loop = t[f"captum LayerGradCam, loop over {args.labels} labels"]
    print(f"gradcam: {captum_loop / t[f'node gradcam, {args.labels} labels']:.1f}x faster than captum's loop")
    if not args.no_lime:
        ours = t["node LIME-1000, 4 labels"]
        for name in ("lime LIME-1000, batch 10, top 4 labels", "lime LIME-1000, batch 256, top 4 labels",
                     "captum Lime-1000, 256 per eval, 4 labels (one call each)"):
            print(f"LIME: {t[name] / ours:.1f}x faster than {name}")
        anchor = t["1000 forward passes (the node's LIME batches)"]
        print(f"LIME: {ours / anchor:.2f}x of 1000 batched forwards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

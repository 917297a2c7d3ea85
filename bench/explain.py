"""Explanation speed: the node's all-label CAM methods against pytorch-grad-cam's loop over labels.

Same model, layer, input and device, in one process; medians of ``--repeats`` runs after a warm-up.
Default: torchvision DenseNet121 (random weights, 14 labels, 224 px, ``features.norm5``), as a
CheXNet-style model. Also times one forward and one forward+backward as anchors.

Usage: ``.venv/bin/python bench/explain.py [--device cpu|cuda] [--repeats 5] [--batch 1]``
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from pytorch_grad_cam import GradCAM as RefGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as RefGradCAMPlusPlus
from pytorch_grad_cam import HiResCAM as RefHiResCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from dicom_node.explain import METHODS
from dicom_node.inference.architectures import BUILDERS

REFERENCES = {"gradcam": RefGradCAM, "gradcampp": RefGradCAMPlusPlus, "hirescam": RefHiResCAM}


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--labels", type=int, default=14)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    device = torch.device(args.device)
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
    print(f"densenet121, {args.labels} labels, {args.size} px, batch {args.batch}, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'what':<52}{'median ms':>11}")
    for what, seconds in rows:
        print(f"{what:<52}{seconds * 1000:>11.1f}")
    timing = dict(rows)
    for name in ("gradcam", "gradcampp", "hirescam"):
        ratio = (timing[f"pytorch-grad-cam {name}, loop over {args.labels} labels"]
                 / timing[f"node {name}, {args.labels} labels"])
        anchor = timing[f"node {name}, {args.labels} labels"] / timing["forward + backward (1 label)"]
        print(f"{name}: node {ratio:.1f}x faster than pytorch-grad-cam's loop; "
              f"{anchor:.2f}x one forward+backward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

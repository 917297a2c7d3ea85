"""Train the demo prototype network on synthetic phantoms, push its prototypes, write it out.

The same phantoms, DICOM round trip and preprocessing as ``models/demo-cxr/train.py`` (its
``example``), the same held-out seeds. ProtoPNet's stages (Chen et al. 2019), adapted to
multi-label: (1) joint training of backbone, add-on layers, prototypes and class connection with
binary cross-entropy plus a cluster cost (each present label: the least distance of one of its
prototypes to some patch of the image; for nodules and consolidations, to a patch on the finding's
mask, IAIA-BL's fine annotation) and a separation cost (each absent label: the same
distance, rewarded when large); (2) push: every prototype is replaced by the feature of the
training patch nearest to it among the images that show its label (on the mask, for the focal
findings), so that it *is* that patch;
(3) last-layer fine-tuning on the pushed similarities (convex; L1 on the connections to other
labels' prototypes). CPU, seeded: the same weights bytes twice.

Writes, next to this file: ``weights.pt``, ``prototypes.json`` (each prototype's training phantom
seed, render size, patch box, label and whether the patch overlaps that label's mask),
and ``metrics.json``; ``evaluate.py`` adds the localisation figures and writes ``model.toml``
and ``MODEL_CARD.md``. Usage: ``nice -n 10 .venv/bin/python models/demo-protopnet/train.py``.
"""

import argparse
import importlib.util
import json
import math
import multiprocessing
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from dicom_node.inference.architectures import build
from dicom_node.inference.manifest import load_manifest
from dicom_node.inference.protopnet import ProtoPNet
from dicom_node.inference.registry import sha256_of
from dicom_node.phantoms import LABELS, render

HERE = Path(__file__).resolve().parent
VERSION = "1.0.0"
TRAIN_SIZES, HELD_OUT_SIZES = (256, 384, 512), (1024,)
CLUSTER, SEPARATION, L1 = 0.8, 0.08, 1e-4  # ProtoPNet's cost weights


def demo_script() -> ModuleType:
    """``models/demo-cxr/train.py``, whose ``example`` makes every image the node's way."""
    spec = importlib.util.spec_from_file_location("demo_cxr_train", HERE.parent / "demo-cxr" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEMO = demo_script()


def dataset(seeds: range, size: int, render_sizes: tuple[int, ...],
            workers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (n, 1, size, size), labels (n, 4) and the focal findings' masks (n, 2, size, size)
    of ``seeds``; in-process when ``workers`` is 0."""
    jobs = [(seed, size, render_sizes) for seed in seeds]
    if workers:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pairs = pool.map(_pair, jobs, chunksize=32)
    else:
        pairs = [_pair(job) for job in jobs]
    return tuple(torch.from_numpy(np.stack([p[k] for p in pairs])) for k in range(3))  # type: ignore[return-value]


def _pair(job: tuple[int, int, tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return DEMO.example(*job)


def render_size(seed: int, render_sizes: tuple[int, ...]) -> int:
    """The size ``example`` rendered ``seed`` at (its generator's first draw)."""
    return int(np.random.default_rng(seed).choice(render_sizes))


def allowed_cells(model: ProtoPNet, y: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(batch, prototypes, h, w): the cells a prototype may be matched to in the cluster cost and
    the push. A focal finding's prototypes: the cells whose stride x stride block touches the
    finding's mask (the fine annotation of Barnett et al. 2021, IAIA-BL); the other labels'
    prototypes: every cell. Images that do not show a prototype's label: no cell."""
    cells = nn.functional.adaptive_max_pool2d(masks.float(), grid).bool()  # (batch, 2, h, w)
    owners = model.prototype_labels.argmax(dim=1)
    per_label = torch.ones(len(y), len(LABELS), *grid, dtype=torch.bool)
    for k, label in enumerate(DEMO.FOCAL):
        per_label[:, LABELS.index(label)] = cells[:, k]
    per_label &= y.bool()[..., None, None]
    return per_label[:, owners]


def costs(model: ProtoPNet, x: torch.Tensor, y: torch.Tensor,
          masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binary cross-entropy, cluster cost (mean over present labels, within a focal finding's
    mask) and separation cost (mean over absent labels) of one batch."""
    out = model.explain(x)
    allowed = allowed_cells(model, y, masks, out.distances.shape[-2:])
    nearest = out.distances.flatten(2).min(dim=2).values  # (batch, prototypes)
    inside = out.distances.masked_fill(~allowed, math.inf).flatten(2).min(dim=2).values
    per_label = nearest.view(len(x), len(LABELS), model.per_label).min(dim=2).values
    within = inside.view(len(x), len(LABELS), model.per_label).min(dim=2).values
    present = y.bool() & torch.isfinite(within)
    cluster = within[present].mean() if present.any() else per_label.new_zeros(())
    separation = per_label[~present].mean() if (~present).any() else per_label.new_zeros(())
    return nn.functional.binary_cross_entropy_with_logits(out.logits, y), cluster, separation


def off_class_l1(model: ProtoPNet) -> torch.Tensor:
    return (model.last_layer.weight * (1 - model.prototype_labels.T)).abs().sum()


def joint(model: ProtoPNet, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, epochs: int, batch: int,
          seed: int) -> list[float]:
    """AdamW with a one-cycle schedule on every parameter; the loss per epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    losses = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch):
            index = order[start:start + batch]
            bce, cluster, separation = costs(model, x[index], y[index], masks[index])
            loss = bce + CLUSTER * cluster - SEPARATION * separation + L1 * off_class_l1(model)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / len(x))
        print(f"joint epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", flush=True)
    return losses


@torch.inference_mode()
def push(model: ProtoPNet, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor,
         batch: int = 128) -> list[tuple[int, int, int]]:
    """Replace every prototype by the nearest patch feature among the training images that show
    its label (for a focal finding, among the cells on its mask: :func:`allowed_cells`); return
    (image index, row, column) of each prototype's patch."""
    model.eval()
    count = model.prototypes.shape[0]
    best = torch.full((count,), math.inf)
    where = [(-1, -1, -1)] * count
    vectors = model.prototypes.detach().clone()
    for start in range(0, len(x), batch):
        z = model.patch_features(x[start:start + batch])
        distances = model.prototype_distances(z)
        h, w = distances.shape[-2:]
        allowed = allowed_cells(model, y[start:start + batch], masks[start:start + batch], (h, w))
        flat = distances.masked_fill(~allowed, math.inf).flatten(2)
        values, cells = flat.permute(1, 0, 2).reshape(count, -1).min(dim=1)
        for j in torch.nonzero(values < best).flatten().tolist():
            image, cell = divmod(int(cells[j]), h * w)
            row, column = divmod(cell, w)
            best[j], where[j] = values[j], (start + image, row, column)
            vectors[j] = z[image, :, row, column].view(-1, 1, 1)
    missing = [j for j in range(count) if where[j][0] < 0]
    if missing:
        raise ValueError(f"no training image shows the label of prototypes {missing}")
    model.prototypes.copy_(vectors)
    return where


def last_layer(model: ProtoPNet, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    """Fine-tune the class connection alone (full batch, Adam) on the pushed similarities."""
    model.eval()
    with torch.inference_mode():
        pooled = torch.cat([model.explain(x[i:i + 128]).similarities for i in range(0, len(x), 128)])
    pooled = pooled.clone()
    optimiser = torch.optim.Adam(model.last_layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(model.last_layer(pooled), y) + L1 * off_class_l1(model)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return losses


def identities(model: ProtoPNet, where: list[tuple[int, int, int]], seeds: range, size: int,
               render_sizes: tuple[int, ...]) -> list[dict]:
    """Each prototype's training patch: phantom seed, render size, box on the model input and on
    the rendered phantom (x0, y0, x1, y1, pixels, end exclusive), label, and whether the patch box
    overlaps the label's finding mask."""
    records = []
    for j, (image, row, column) in enumerate(where):
        seed, label = seeds[image], LABELS[int(model.prototype_labels[j].argmax())]
        rendered = render_size(seed, render_sizes)
        box = model.patch_box(row, column, size)
        scale = rendered / size  # phantoms are square: the letterbox only scales
        source = [math.floor(box[0] * scale), math.floor(box[1] * scale),
                  math.ceil(box[2] * scale), math.ceil(box[3] * scale)]
        mask = render(seed, rendered).masks.get(label)
        overlaps = bool(mask is not None and mask[source[1]:source[3], source[0]:source[2]].any())
        records.append({"prototype": j, "label": label, "seed": seed, "render_size": rendered,
                        "cell": [row, column], "box_model": list(box), "box_source": source,
                        "shows_finding": overlaps})
    return records


@torch.inference_mode()
def probabilities(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([torch.sigmoid(model(x[i:i + 64])) for i in range(0, len(x), 64)]).numpy()


def aucs(scores: np.ndarray, y: torch.Tensor) -> dict[str, float]:
    truth = y.numpy().astype(bool)
    return {label: round(DEMO.auc(scores[:, k], truth[:, k]), 4) for k, label in enumerate(LABELS)}


def demo_aucs(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The demo classifier's AUCs on the same held-out images."""
    manifest = load_manifest(HERE.parent / "demo-cxr" / "model.toml")
    model = build(manifest.architecture, len(manifest.labels), manifest.input.channels, manifest.weights)
    return aucs(probabilities(model, x), y)


def held_out_aucs(model: ProtoPNet, xt: torch.Tensor, yt: torch.Tensor) -> dict:
    """Both models' AUCs on the held-out phantoms."""
    return {"protopnet": aucs(probabilities(model, xt), yt), "demo-cxr": demo_aucs(xt, yt),
            "positives": {k: int(v) for k, v in zip(LABELS, yt.sum(0).tolist(), strict=True)}}


def fit(args: argparse.Namespace) -> tuple[ProtoPNet, dict]:
    """Data, the three stages and the held-out figures; the model and the metrics."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seeds = range(args.seed, args.seed + args.train)
    x, y, masks = dataset(seeds, args.size, TRAIN_SIZES, args.workers)
    print(f"{len(x)} training phantoms in {time.perf_counter() - started:.0f} s", flush=True)
    model = ProtoPNet(len(LABELS), 1)
    losses = joint(model, x, y, masks, args.epochs, args.batch, args.seed)
    held = (dataset(range(DEMO.HELD_OUT_SEED, DEMO.HELD_OUT_SEED + args.held_out), args.size, HELD_OUT_SIZES,
                    args.workers)[:2] if args.held_out else None)
    metrics_before = held_out_aucs(model, *held) if held else {}
    where = push(model, x, y, masks)
    tuned = last_layer(model, x, y, args.last_steps)
    model.eval()
    metrics: dict = {"version": VERSION, "losses": [round(v, 5) for v in losses],
                     "last_layer_loss": [round(tuned[0], 5), round(tuned[-1], 5)] if tuned else [],
                     "prototypes": identities(model, where, seeds, args.size, TRAIN_SIZES)}
    if held:
        metrics["held_out"] = held_out_aucs(model, *held) | {"protopnet_before_push": metrics_before["protopnet"]}
    metrics["training"] = {
        "phantoms": args.train, "held_out": args.held_out, "size": args.size, "epochs": args.epochs,
        "batch": args.batch, "last_steps": args.last_steps, "seed": args.seed,
        "render_sizes_train": TRAIN_SIZES, "render_sizes_held_out": HELD_OUT_SIZES,
        "minutes": round((time.perf_counter() - started) / 60, 1), "threads": args.threads,
        "machine": platform.machine(), "python": sys.version.split()[0], "torch": torch.__version__}
    return model, metrics


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=2500, help="training phantoms")
    p.add_argument("--held-out", type=int, default=500, help="held-out phantoms (0: none)")
    p.add_argument("--size", type=int, default=128, help="model input side")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--last-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="processes making phantoms (0: this one)")
    p.add_argument("--out", type=Path, default=HERE)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    model, metrics = fit(args)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "weights.pt"
    torch.save(model.state_dict(), weights)
    sha256 = sha256_of(weights)
    metrics["sha256"] = sha256
    (args.out / "prototypes.json").write_text(json.dumps(metrics.pop("prototypes"), indent=1) + "\n")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {weights} (sha256 {sha256[:12]})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

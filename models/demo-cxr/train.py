"""Train the demo chest model on synthetic phantoms, evaluate it on held-out phantoms, write it out.

Seeded and CPU-only; every image goes the way a received instance goes: phantom -> DICOM CR
(12-bit, MONOCHROME1 or MONOCHROME2) -> the node's own preprocessing. Writes, next to this file:
``weights.pt``, ``model.toml`` (with the weights' sha256), ``metrics.json`` and ``MODEL_CARD.md``.

Usage: ``.venv/bin/python models/demo-cxr/train.py`` (about 10 minutes on 2 cores).
"""

import argparse
import json
import math
import multiprocessing
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dicom_node.inference.architectures import BUILDERS
from dicom_node.inference.manifest import InputSpec
from dicom_node.inference.preprocess import preprocess
from dicom_node.inference.registry import sha256_of
from dicom_node.phantoms import LABELS, render, to_dataset

HERE = Path(__file__).resolve().parent
VERSION = "2.0.0"
DESIGNS = {  # what the card says of each architecture this script can train, and its CAM layer
    "compact_cnn": ("four 3x3 conv blocks (8/16/32/64 channels, batch norm, ReLU, 2x2 max-pooling "
                    "after the first two), global average + max pooling, two linear layers "
                    "(128 -> 32 -> 4); about 30 M multiply-adds an image at 128 px", "features.relu4"),
    "small_cnn": ("three 3x3 conv blocks (32/64/128 channels, batch norm, ReLU, 2x2 max-pooling "
                  "after the first two), global average + max pooling, two linear layers "
                  "(256 -> 64 -> 4); about 156 M multiply-adds an image at 128 px", "features.relu3"),
}
HELD_OUT_SEED = 1_000_000  # held-out phantoms use seeds from here on; training seeds stay below
CODES = {  # SNOMED CT concepts for the findings
    "nodule": ("SCT", "27925004", "Nodule"),
    "consolidation": ("SCT", "95436008", "Lung consolidation"),
    "effusion": ("SCT", "60046008", "Pleural effusion"),
    "cardiomegaly": ("SCT", "8186001", "Cardiomegaly"),
}


def example(seed: int, size: int, render_sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One phantom through DICOM and preprocessing: (input (1, size, size), labels (4,))."""
    rng = np.random.default_rng(seed)
    rendered = render(seed, int(rng.choice(render_sizes)))
    photometric = "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2"
    ds = to_dataset(rendered, modality=str(rng.choice(["CR", "DX"])), photometric=photometric,
                    bits_stored=int(rng.choice([12, 14, 16])))
    [item] = preprocess(ds, InputSpec(size=size))
    return item.array, np.array([rendered.labels[label] for label in LABELS], dtype=np.float32)


def _example(args: tuple[int, int, tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
    return example(*args)


def dataset(seeds: range, size: int, render_sizes: tuple[int, ...], workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels for ``seeds``, made in ``workers`` processes."""
    jobs = [(seed, size, render_sizes) for seed in seeds]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pairs = pool.map(_example, jobs, chunksize=32)
    return (torch.from_numpy(np.stack([p[0] for p in pairs])),
            torch.from_numpy(np.stack([p[1] for p in pairs])))


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    positives = truth.astype(bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, seed: int) -> list[float]:
    """AdamW with a one-cycle schedule on binary cross-entropy; returns the loss per epoch."""
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(x) / batch)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    losses = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch):
            index = order[start:start + batch]
            loss = nn.functional.binary_cross_entropy_with_logits(model(x[index]), y[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / len(x))
        print(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", flush=True)
    return losses


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float]]:
    """AUC, and sensitivity/specificity at 0.5, per label."""
    model.eval()
    probabilities = torch.cat([torch.sigmoid(model(x[i:i + 64])) for i in range(0, len(x), 64)]).numpy()
    truth = y.numpy().astype(bool)
    report = {}
    for k, label in enumerate(LABELS):
        predicted = probabilities[:, k] >= 0.5
        report[label] = {
            "auc": round(auc(probabilities[:, k], truth[:, k]), 4),
            "sensitivity": round(float((predicted & truth[:, k]).sum() / truth[:, k].sum()), 4),
            "specificity": round(float((~predicted & ~truth[:, k]).sum() / (~truth[:, k]).sum()), 4),
            "positives": int(truth[:, k].sum()),
        }
    return report


def manifest(args: argparse.Namespace, sha256: str) -> str:
    labels = "".join(
        f'\n[[labels]]\nname = "{label}"\nthreshold = 0.5\ncode = {json.dumps(list(CODES[label]))}\n'
        for label in LABELS
    )
    return (
        f'name = "demo-cxr"\nversion = "{VERSION}"\narchitecture = "{args.architecture}"\n'
        f'weights = "weights.pt"\nsha256 = "{sha256}"\ncam_layer = "{DESIGNS[args.architecture][1]}"\n'
        'intended_use = "Research demo trained on synthetic phantoms, not for clinical use."\n\n'
        f'[input]\nsize = {args.size}\nchannels = 1\nnormalization = "zero_one"\nmultiframe = "middle"\n\n'
        '[scope]\nmodalities = ["CR", "DX"]\nbody_parts = ["CHEST"]\n' + labels
    )


def model_card(metrics: dict) -> str:
    """MODEL_CARD.md from the figures this run measured (nothing typed in by hand)."""
    t = metrics["training"]
    rows = "\n".join(
        f"| {label} | {m['auc']:.4f} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | {m['positives']} |"
        for label, m in metrics["held_out"].items()
    )
    return f"""# Model card: demo-cxr {metrics['version']}

**Research demo trained on synthetic phantoms, not for clinical use.** It has never seen a
real radiograph; its outputs on real images mean nothing. It exists so that the node's
explanations can be measured against known ground truth.

| | |
| --- | --- |
| Architecture | `{t['architecture']}`: {DESIGNS[t['architecture']][0]} |
| Input | {t['size']} x {t['size']}, 1 channel, values in [0, 1] after the file's VOI window (the node's preprocessing, letterboxed) |
| Outputs | 4 independent logits (sigmoid): nodule, consolidation, effusion, cardiomegaly; threshold 0.5 each |
| CAM layer | `{DESIGNS[t['architecture']][1]}` |
| Weights | `weights.pt`, sha256 `{metrics['sha256']}` |
| Scope | CR and DX, chest, frontal |

## Training data

{t['phantoms']} phantoms from `dicom_node.phantoms` (seeds {t['seed']} to {t['seed'] + t['phantoms'] - 1}),
rendered at {', '.join(map(str, t['render_sizes_train']))} px, each finding present independently
with probability 0.4. Every phantom was written as a DICOM CR or DX instance (12, 14 or 16 bits
stored; 30 % MONOCHROME1) and read back through the node's own preprocessing, exactly as a
received instance is. The phantoms' known biases carry over: nodules and consolidations only in
the upper and middle zones, effusions always moderate (no blunting-only effusion), cardiomegaly
as a cardiothoracic ratio of 0.58-0.68 against 0.42-0.48.

## Training

AdamW (lr 3e-3, weight decay 1e-4), one-cycle schedule, binary cross-entropy, batch {t['batch']},
{t['epochs']} epochs, seed {t['seed']}, on {t['threads']} CPU threads: {t['minutes']} minutes in all
(data, training and evaluation), {t['machine']}, Python {t['python']}, torch {t['torch']}.
Loss per epoch: {', '.join(f'{v:.3f}' for v in metrics['losses'])}.

## Held-out results

{t['held_out']} phantoms never used in training (seeds from {HELD_OUT_SEED}), rendered at
{', '.join(map(str, t['render_sizes_held_out']))} px, through DICOM and preprocessing as above:

| label | AUC | sensitivity at 0.5 | specificity at 0.5 | positives |
| --- | --- | --- | --- | --- |
{rows}

## Reproduce

```sh
.venv/bin/python models/demo-cxr/train.py
.venv/bin/python models/demo-cxr/evaluate_explanations.py
```

The first writes `weights.pt`, `model.toml`, `metrics.json` and this card, the second the
"Explanations" section and `explanations.json`. The run is seeded; torch's CPU
kernels may still differ in the last bits between machines, so the sha256 may differ.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000, help="training phantoms")
    parser.add_argument("--held-out", type=int, default=500, help="held-out phantoms")
    parser.add_argument("--size", type=int, default=128, help="model input side")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--architecture", default="compact_cnn", choices=sorted(DESIGNS))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    train_sizes, test_sizes = (256, 384, 512), (1024,)
    x, y = dataset(range(args.seed, args.seed + args.train), args.size, train_sizes, args.threads)
    xt, yt = dataset(range(HELD_OUT_SEED, HELD_OUT_SEED + args.held_out), args.size, test_sizes,
                     args.threads)
    made = time.perf_counter() - started
    print(f"{len(x)} training and {len(xt)} held-out phantoms in {made:.0f} s", flush=True)

    model = BUILDERS[args.architecture](len(LABELS), 1)
    losses = train(model, x, y, args.epochs, args.batch, args.seed)
    report = evaluate(model, xt, yt)
    elapsed = time.perf_counter() - started
    for label, figures in report.items():
        print(f"{label:<14} AUC {figures['auc']:.4f}  sensitivity {figures['sensitivity']:.3f}  "
              f"specificity {figures['specificity']:.3f}  ({figures['positives']} positives)")
    print(f"total {elapsed / 60:.1f} min", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "weights.pt"
    torch.save(model.eval().state_dict(), weights)
    sha256 = sha256_of(weights)
    (args.out / "model.toml").write_text(manifest(args, sha256))
    metrics = {
        "version": VERSION, "sha256": sha256, "held_out": report, "losses": [round(v, 5) for v in losses],
        "training": {"architecture": args.architecture, "phantoms": args.train, "held_out": args.held_out, "size": args.size,
                     "epochs": args.epochs, "batch": args.batch, "seed": args.seed,
                     "render_sizes_train": train_sizes, "render_sizes_held_out": test_sizes,
                     "minutes": round(elapsed / 60, 1), "threads": args.threads,
                     "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                     "python": sys.version.split()[0], "torch": torch.__version__},
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (args.out / "MODEL_CARD.md").write_text(model_card(metrics))
    print(f"wrote {weights} (sha256 {sha256[:12]}), model.toml, metrics.json, MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

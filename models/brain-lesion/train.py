"""Train the brain lesion attention U-Net on brain MR phantoms and write it out as a model folder.

Seeded and CPU-only. Every training volume goes the way a received series goes: phantom ->
DICOM MR Image series -> :func:`dicom_node.inference.volume.assemble` -> the model grid
(:func:`dicom_node.inference.volume.resample`) -> :func:`dicom_node.inference.segment.normalise`,
and the network is MONAI's ``AttentionUnet`` built by the node's own builder from the same
``[network]`` the manifest gets, so training and serving cannot drift. The target is the whole
lesion (tumour-like core and oedema), resampled to the model grid by the same linear map (a
soft target: the fraction of lesion at each model voxel, as the served probability is read back
on the source grid through the same map and thresholded at 0.5 there).

Writes, next to this file (or ``--out``): ``weights.pt``, ``model.toml`` (with the weights'
sha256) and ``training.json`` (the figures of the run). ``evaluate.py`` then writes
``metrics.json``.

Usage: ``PYTHONPATH=. nice -n 10 .venv/bin/python models/brain-lesion/train.py`` (16-18 minutes on
the 2-core VM under a load average of 3-6, phantoms included).
"""

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss

from dicom_node.inference.architectures import BUILDERS
from dicom_node.inference.manifest import load_manifest
from dicom_node.inference.registry import LoadedModel, sha256_of
from dicom_node.inference.segment import lesion_volume_mm3, normalise, segment_volume
from dicom_node.inference.volume import Volume, assemble, resample
from dicom_node.phantoms.brain import render_brain
from dicom_node.phantoms.mr import mr_series

HERE = Path(__file__).resolve().parent
NAME = "brain-lesion"
VERSION = "1.0.0"
GRID = (90, 116, 96)
"""The model grid (slices, rows, columns) over the series' field of view: 2.0 x 1.98 x 1.98 mm
for the phantoms' 180 x 230 x 190 mm field, whether the series has 2 mm or 1 mm voxels."""
NETWORK = {"spatial_dims": 2, "channels": [8, 16, 32], "strides": [2, 2]}
NORMALIZATION = "zscore_nonzero"
CAM_LAYER = "model.1.submodule.1.merge"
SPACING_MM = 2.0  # training phantoms' voxels
HELD_OUT_SEED = 1_000_000  # held-out phantoms use seeds from here on; training seeds stay below
VALIDATION_SEED = 900_000  # the threshold's phantoms: neither trained on nor held out
THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))  # 0.3 to 0.9
LESION_SHARE = 0.6  # share of the crops centred near a lesion voxel
INTENDED_USE = ("Research on synthetic brain MR phantoms (FLAIR-like, MNI152-based): lesion "
                "segmentation and its explanations; not for clinical use.")


def example(seed: int, spacing: float, grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One phantom through DICOM and the node's volume preprocessing: the normalised model-grid
    input and the whole lesion's share of each model voxel (both (slices, rows, columns))."""
    phantom = render_brain(seed, spacing=spacing)
    volume = assemble(mr_series(phantom))
    if not np.array_equal(volume.array, phantom.pixels.astype(np.float32)):
        raise RuntimeError(f"seed {seed}: the assembled series is not the phantom's voxel order")
    grid_array, _ = resample(volume, grid)
    truth = Volume(array=phantom.lesion.astype(np.float32), affine=volume.affine, sources=volume.sources)
    target, _ = resample(truth, grid)
    return normalise(grid_array, NORMALIZATION), np.clip(target, 0.0, 1.0)


def _example(args: tuple[int, float, tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    return example(*args)


def dataset(seeds: range, spacing: float, grid: tuple[int, int, int],
            workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (N, slices, rows, columns) for ``seeds``, made in ``workers`` processes
    (in seed order whatever the workers' timing)."""
    jobs = [(seed, spacing, grid) for seed in seeds]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pairs = pool.map(_example, jobs, chunksize=1)
    else:
        pairs = [_example(job) for job in jobs]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def crops(x: np.ndarray, y: np.ndarray, count: int, side: int,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` square slice crops (count, 1, side, side): a share centred near a lesion voxel,
    the rest anywhere in a slice through the head; each mirrored left-right at random."""
    n, depth, rows, columns = x.shape
    lesions = [np.argwhere(t >= 0.5) for t in y]
    with_lesion = [i for i, voxels in enumerate(lesions) if len(voxels)]
    xs, ys = [], []
    for _ in range(count):
        if with_lesion and rng.random() < LESION_SHARE:
            i = with_lesion[int(rng.integers(len(with_lesion)))]
            k, r, c = lesions[i][int(rng.integers(len(lesions[i])))]
            r += int(rng.integers(-side // 3, side // 3 + 1))
            c += int(rng.integers(-side // 3, side // 3 + 1))
        else:
            i, k = int(rng.integers(n)), int(rng.integers(depth // 8, depth - depth // 8))
            r, c = int(rng.integers(rows)), int(rng.integers(columns))
        r0 = int(np.clip(r - side // 2, 0, rows - side))
        c0 = int(np.clip(c - side // 2, 0, columns - side))
        patch = (slice(r0, r0 + side), slice(c0, c0 + side))
        a, b = x[i, k][patch], y[i, k][patch]
        if rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        xs.append(a)
        ys.append(b)
    return (torch.from_numpy(np.stack(xs)[:, None].copy()), torch.from_numpy(np.stack(ys)[:, None].copy()))


def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, steps: int, batch: int, side: int,
          seed: int, lr: float) -> list[float]:
    """Adam with a cosine schedule on DiceCE (sigmoid; Dice over the whole batch, so that crops
    without lesion count); returns the mean loss of each tenth of the steps."""
    rng = np.random.default_rng([seed, 7])
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses: list[float] = []
    for step in range(steps):
        inputs, targets = crops(x, y, batch, side, rng)
        loss = loss_fn(model(inputs), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(losses[-max(1, steps // 10):]):.4f}", flush=True)
    tenth = max(1, steps // 10)
    return [round(float(np.mean(losses[i:i + tenth])), 5) for i in range(0, steps, tenth)]


def calibrate_threshold(model: torch.nn.Module, grid: tuple[int, int, int], count: int,
                        spacing: float) -> tuple[float, list[dict[str, float]]]:
    """The lesion threshold (of ``THRESHOLDS``) whose volumes on ``count`` validation phantoms
    (seeds from ``VALIDATION_SEED``, each with a lesion) are closest to the truth: the smallest
    median absolute relative error of the volume the SR reports. Each phantom goes the pipeline's
    way (DICOM series, assembled, :func:`segment_volume`: thresholded on the SOURCE grid), so the
    threshold corrects what the map back to the source grid does to a lesion's border."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.toml"
        path.write_text(manifest("0" * 64, grid))
        loaded = LoadedModel(load_manifest(path), model.eval(), torch.device("cpu"))
    errors, rows = [], []
    for seed in range(VALIDATION_SEED, VALIDATION_SEED + count):
        phantom = render_brain(seed, spacing=spacing, lesion=True)
        volume = assemble(mr_series(phantom))
        probabilities = segment_volume(loaded, volume).probabilities[0]
        truth = phantom.lesion_volume_mm3
        found = [lesion_volume_mm3(probabilities >= t, volume.affine) for t in THRESHOLDS]
        errors.append([abs(f / truth - 1.0) for f in found])
        rows.append({"seed": seed, "truth_cm3": round(truth / 1000, 4),
                     **{str(t): round(f / 1000, 4) for t, f in zip(THRESHOLDS, found, strict=True)}})
    median = np.median(np.array(errors), axis=0)
    return THRESHOLDS[int(np.argmin(median))], rows


def manifest(sha256: str, grid: tuple[int, int, int], threshold: float = 0.5) -> str:
    return (
        f'name = "{NAME}"\nversion = "{VERSION}"\ntask = "segmentation"\narchitecture = "attention_unet"\n'
        f'weights = "weights.pt"\nsha256 = "{sha256}"\ncam_layer = "{CAM_LAYER}"\n'
        f'intended_use = "{INTENDED_USE}"\n\n'
        f'[network]\nspatial_dims = {NETWORK["spatial_dims"]}\nchannels = {NETWORK["channels"]}\n'
        f'strides = {NETWORK["strides"]}\n\n'
        f'[input]\nvolume = {list(grid)}\nchannels = 1\nnormalization = "{NORMALIZATION}"\n\n'
        '[scope]\nmodalities = ["MR"]\nbody_parts = ["BRAIN", "HEAD"]\n\n'
        '[[labels]]\nname = "lesion"\n'
        f'threshold = {threshold}\ncode = ["SCT", "52988006", "Lesion"]\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=64, help="training phantoms (seeds from --seed)")
    parser.add_argument("--spacing", type=float, default=SPACING_MM, help="training phantoms' voxel mm")
    parser.add_argument("--grid", type=int, nargs=3, default=list(GRID), help="model grid D H W")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=64, help="side of the training crops")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validation", type=int, default=12, help="phantoms choosing the threshold")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    if args.seed + args.train > VALIDATION_SEED:
        parser.error(f"training seeds must stay below the validation ones ({VALIDATION_SEED}) and the "
                     f"held-out ones ({HELD_OUT_SEED})")
    if VALIDATION_SEED + args.validation > HELD_OUT_SEED:
        parser.error(f"validation seeds must stay below the held-out ones ({HELD_OUT_SEED})")
    grid = (args.grid[0], args.grid[1], args.grid[2])
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    load_before = os.getloadavg()
    started = time.perf_counter()

    x, y = dataset(range(args.seed, args.seed + args.train), args.spacing, grid, args.threads)
    made = time.perf_counter() - started
    print(f"{len(x)} training phantoms ({int((y >= 0.5).any(axis=(1, 2, 3)).sum())} with a lesion) "
          f"in {made:.0f} s", flush=True)
    model = BUILDERS["attention_unet"](1, 1, **NETWORK)
    losses = train(model, x, y, args.steps, args.batch, min(args.crop, grid[1], grid[2]), args.seed, args.lr)
    with_lesion = int((y >= 0.5).any(axis=(1, 2, 3)).sum())
    del x, y
    threshold, validation = calibrate_threshold(model, grid, args.validation, args.spacing)
    print(f"threshold {threshold} (from {args.validation} validation phantoms)", flush=True)
    elapsed = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "weights.pt"
    torch.save(model.eval().state_dict(), weights)
    sha256 = sha256_of(weights)
    (args.out / "model.toml").write_text(manifest(sha256, grid, threshold))
    figures = {
        "version": VERSION, "sha256": sha256, "losses_by_tenth": losses,
        "phantoms": args.train, "with_lesion": with_lesion,
        "seeds": [args.seed, args.seed + args.train - 1], "spacing_mm": args.spacing, "grid": list(grid),
        "network": NETWORK, "steps": args.steps, "batch": args.batch, "crop": args.crop, "lr": args.lr,
        "loss": "MONAI DiceCELoss(sigmoid=True, batch=True)", "optimiser": "Adam, one-cycle cosine",
        "augmentation": "left-right mirroring; crops centred near a lesion voxel with p=0.6",
        "threshold": threshold, "validation": validation, "phantom_seconds": round(made, 1), "total_seconds": round(elapsed, 1), "threads": args.threads,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"total {elapsed / 60:.1f} min; wrote {weights} (sha256 {sha256[:12]}), model.toml, training.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Regenerate the demo model's input-distribution reference and its figures in MODEL_CARD.md.

1. Writes 500 phantom radiographs (seeds 3,000,000 to 3,000,499: never used in training, in the
   model card's held-out set or in the gate's tests, which use 4,000,000 and up) as CR and DX,
   MONOCHROME1 and 2, at 128, 256 and 512 px, to a temporary folder, and runs
   ``dicom-node models calibrate demo-cxr FOLDER --update`` (``reference.npz``, ``[gate]``).
2. Measures the gate on held-out phantoms (seeds from 4,100,000, the same mix, plus 768 px) and
   on each generated out-of-distribution set of ``tests/inference/ood.py`` (seeds from
   5,100,000, 128 px), and writes the "Input-distribution gate" section of MODEL_CARD.md.

Run it after ``train.py`` (which rewrites ``model.toml`` and the card)::

    .venv/bin/python models/demo-cxr/calibrate_gate.py [--held-out 300] [--per-set 50]
"""

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository: tests.inference.ood generates the sets

import numpy as np  # noqa: E402

from dicom_node.cli import main  # noqa: E402
from dicom_node.inference import InferenceRunner, ModelRegistry, preprocess  # noqa: E402
from dicom_node.inference.calibrate import vectors  # noqa: E402
from dicom_node.phantoms import render, to_dataset  # noqa: E402
from tests.inference.ood import OOD_SETS, as_chest_cr  # noqa: E402

FIRST_SEED = 3_000_000
COUNT = 500
SIZES = (128, 256, 512)
START, END = "<!-- gate: written by calibrate_gate.py -->", "<!-- end of gate -->"


def write_phantoms(folder: Path) -> None:
    for i in range(COUNT):
        ds = to_dataset(render(FIRST_SEED + i, SIZES[i % len(SIZES)]), modality="DX" if i % 2 else "CR",
                        photometric="MONOCHROME1" if i % 5 == 0 else "MONOCHROME2")
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)


def measure(held_out: int, per_set: int) -> tuple[float, list[tuple[str, int, float, float, float]]]:
    """The threshold, then (set, images, abstained share, min score, median score) per set."""
    runner = InferenceRunner(ModelRegistry(HERE.parent), device="cpu")
    loaded = runner.model("demo-cxr")
    assert loaded.manifest.gate is not None and loaded.reference is not None
    spec, threshold = loaded.manifest.input, loaded.manifest.gate.threshold

    def row(name: str, datasets: list) -> tuple[str, int, float, float, float]:
        inputs = [x for ds in datasets for x in preprocess(ds, spec)]
        scores = loaded.reference.score(vectors(runner, "demo-cxr", inputs))  # type: ignore[union-attr]
        return name, len(scores), float((scores > threshold).mean()), float(scores.min()), float(np.median(scores))

    sizes = (*SIZES, 768)
    rows = [row("held-out phantoms (in distribution)", [
        to_dataset(render(4_100_000 + i, sizes[i % len(sizes)]), modality="DX" if i % 2 else "CR",
                   photometric="MONOCHROME1" if i % 5 == 0 else "MONOCHROME2") for i in range(held_out)])]
    for size in (64, 32):  # far below the input size, upscaled: blurred
        rows.append(row(f"phantoms rendered at {size} px", [to_dataset(render(4_150_000 + i, size))
                                                            for i in range(per_set)]))
    for name, generate in OOD_SETS.items():
        rows.append(row(name, [as_chest_cr(generate(5_100_000 + i, 128), 5_100_000 + i) for i in range(per_set)]))
    return threshold, rows


def card_section(report: str, threshold: float, rows: list[tuple[str, int, float, float, float]]) -> str:
    table = "\n".join(f"| {name} | {n} | {share:.1%} | {low:.2f} | {mid:.2f} |" for name, n, share, low, mid in rows)
    return f"""{START}
## Input-distribution gate

`reference.npz` (sha256 in `model.toml` `[gate]`) describes 400 phantoms (seeds 3,000,000 to
3,000,499 less a held-out fifth; CR and DX, MONOCHROME1 and 2, 128/256/512 px): the CAM layer's
pooled activations and image statistics (see docs/models.md). Threshold {threshold} = 1.25 x the
99.5th percentile of out-of-fold scores. Calibration's own report:

```
{report.strip()}
```

Abstention on held-out phantoms and on generated out-of-distribution sets, each relabelled as a
CR chest (`tests/inference/ood.py`; the tests check the same at other seeds):

| set | images | abstained | min score | median score |
| --- | --- | --- | --- | --- |
{table}

How lateral-like the "lateral-like" sets are: `squeezed` has a lateral's narrow outline, not
its anatomy; `half_mirrored` shows one hemithorax twice and is caught mostly by the left-right
asymmetry statistic (a real image is never exactly symmetric; a nearly symmetric one may pass);
`side_profile` is a drawn side-on trunk (spine behind, one lung field), not a rendered lateral.
Phantoms rendered far below the input size and upscaled (rows "rendered at 64/32 px") are not
in the reference; the table shows where the gate puts them. A real radiograph was never part of the
reference: the gate is expected to abstain on real images with this demo model.

Reproduce (after `train.py`): `.venv/bin/python models/demo-cxr/calibrate_gate.py`.
{END}
"""


def write_card(section: str) -> None:
    card = HERE / "MODEL_CARD.md"
    text = card.read_text()
    if START in text:  # replaced, without piling up blank lines before it
        text = text[:text.index(START)].rstrip("\n") + "\n\n" + text[text.index(END) + len(END) + 1:].lstrip("\n")
    marker = "## Reproduce"
    card.write_text(text.replace(marker, section + "\n" + marker, 1))


def run() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--per-set", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_phantoms(Path(folder))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main(["models", "calibrate", "demo-cxr", folder, "--update", "--seed", "0",
                         "--set", f"models.dir={HERE.parent}"])
    print(printed.getvalue(), end="")
    if code:
        return code
    report = printed.getvalue().split("\n[gate]")[0].replace(str(HERE.parents[1]) + "/", "")
    threshold, rows = measure(args.held_out, args.per_set)
    write_card(card_section(report, threshold, rows))
    for name, n, share, low, mid in rows:
        print(f"{name:<36} {n:>4} images, abstained {share:.1%}, min score {low:.2f}, median {mid:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run())

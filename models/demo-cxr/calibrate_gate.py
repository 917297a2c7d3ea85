"""Regenerate the demo model's input-distribution reference (``reference.npz`` and ``[gate]``).

Writes 500 phantom radiographs (seeds 3,000,000 to 3,000,499: never used in training, in the
model card's held-out set or in the gate's tests, which use 4,000,000 and up) as CR and DX,
MONOCHROME1 and 2, at 128, 256 and 512 px, to a temporary folder, then runs
``dicom-node models calibrate demo-cxr FOLDER --update``. Run it after retraining::

    python models/demo-cxr/calibrate_gate.py
"""

import sys
import tempfile
from pathlib import Path

from dicom_node.cli import main
from dicom_node.phantoms import render, to_dataset

FIRST_SEED = 3_000_000
COUNT = 500
SIZES = (128, 256, 512)


def write_phantoms(folder: Path) -> None:
    for i in range(COUNT):
        ds = to_dataset(render(FIRST_SEED + i, SIZES[i % len(SIZES)]), modality="DX" if i % 2 else "CR",
                        photometric="MONOCHROME1" if i % 5 == 0 else "MONOCHROME2")
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)


if __name__ == "__main__":
    models = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as folder:
        write_phantoms(Path(folder))
        sys.exit(main(["models", "calibrate", "demo-cxr", folder, "--update", "--seed", "0",
                       "--set", f"models.dir={models}"]))

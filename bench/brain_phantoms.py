"""Time to make and write brain MR phantoms: 180 slices at 1 mm, and 2 mm.

For each spacing and writer (MR Image series, one Enhanced MR Image instance): ``render_brain(seed,
spacing=..., lesion=True)`` and ``write_brain`` into a temporary folder, median over the seeds.
Importing nilearn and loading the MNI152 templates (once per process) is timed apart.

Usage: ``.venv/bin/python bench/brain_phantoms.py [--seeds 3]``
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    from dicom_node.phantoms.brain import load_templates, render_brain
    from dicom_node.phantoms.mr import write_brain

    load_templates()
    print(f"import nilearn and load the templates: {time.perf_counter() - start:.2f} s")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for spacing in (1.0, 2.0):
        for enhanced in (False, True):
            renders, writes = [], []
            for seed in range(1, args.seeds + 1):
                start = time.perf_counter()
                ph = render_brain(seed, spacing=spacing, lesion=True)
                renders.append(time.perf_counter() - start)
                with tempfile.TemporaryDirectory() as folder:
                    start = time.perf_counter()
                    paths = write_brain(Path(folder), ph, enhanced=enhanced)
                    writes.append(time.perf_counter() - start)
            print(f"spacing {spacing} mm, shape {ph.pixels.shape}, {'enhanced' if enhanced else 'MR series'} "
                  f"({len(paths)} files): render {statistics.median(renders):.2f} s, "
                  f"write {statistics.median(writes):.2f} s (medians)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""``python -m dicom_node.phantoms OUT_DIR --count N --seed S``: write one phantom chest study as DICOM files.

``python -m dicom_node.phantoms brain OUT_DIR --count N --seed S [--enhanced] [--spacing MM]``: write
N brain MR phantoms (seeds S .. S+N-1), each a study in its own folder ``OUT_DIR/brain-<seed>``.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dicom_node.phantoms.dataset import SOP_CLASSES, write_study


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dicom_node.phantoms",
        description="Write synthetic chest radiographs (one study, one series) as DICOM files. "
                    "'python -m dicom_node.phantoms brain --help' writes brain MR volumes.",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder for the files (created)")
    parser.add_argument("--count", type=int, default=1, help="number of instances (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first instance (default 0)")
    parser.add_argument("--size", type=int, default=2048, help="rows and columns (default 2048)")
    parser.add_argument("--modality", choices=sorted(SOP_CLASSES), default="CR")
    parser.add_argument("--photometric", choices=("MONOCHROME1", "MONOCHROME2"), default="MONOCHROME2")
    parser.add_argument("--bits-stored", type=int, default=12, choices=range(12, 17), metavar="{12..16}")
    return parser


def _brain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dicom_node.phantoms brain",
        description="Write synthetic brain MR volumes (FLAIR-like, 0 or 1 tumour-like lesion), one study "
                    "per seed in OUT_DIR/brain-<seed>.",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder for the studies (created)")
    parser.add_argument("--count", type=int, default=1, help="number of volumes (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first volume (default 0)")
    parser.add_argument("--spacing", type=float, default=1.0, help="in-plane spacing in mm (default 1)")
    parser.add_argument("--slice-spacing", type=float, default=None,
                        help="mm between slices (default: --spacing)")
    parser.add_argument("--slices", type=int, default=None, help="number of slices (default: 180 mm worth)")
    parser.add_argument("--lesion", choices=("drawn", "yes", "no"), default="drawn",
                        help="a lesion in every volume, in none, or drawn from the seed (default)")
    parser.add_argument("--oblique", action="store_true", help="tilt the slices about the left-right axis")
    parser.add_argument("--enhanced", action="store_true", help="one Enhanced MR Image instance per volume "
                        "instead of one MR Image instance per slice")
    return parser


def _brain(argv: Sequence[str]) -> int:
    from dicom_node.phantoms.brain import render_brain
    from dicom_node.phantoms.mr import write_brain

    parser = _brain_parser()
    args = parser.parse_args(argv)
    if args.count < 1 or args.seed < 0:
        parser.error("--count must be at least 1 and --seed non-negative")
    lesion = {"drawn": None, "yes": True, "no": False}[args.lesion]
    for seed in range(args.seed, args.seed + args.count):
        try:
            ph = render_brain(seed, spacing=args.spacing, slice_spacing=args.slice_spacing,
                              slices=args.slices, lesion=lesion, oblique=args.oblique)
        except ValueError as exc:
            parser.error(str(exc))
        folder = args.out_dir / f"brain-{seed}"
        paths = write_brain(folder, ph, enhanced=args.enhanced)
        truth = f"lesion {ph.lesion_volume_mm3:.0f} mm3" if ph.has_lesion else "no lesion"
        print(f"seed {seed}: {len(paths)} files written to {folder} ({truth})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (2 for bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["brain"]:
        return _brain(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.count < 1 or args.seed < 0:
        parser.error("--count must be at least 1 and --seed non-negative")
    try:
        paths = write_study(args.out_dir, args.count, args.seed, size=args.size, modality=args.modality,
                            photometric=args.photometric, bits_stored=args.bits_stored)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"{len(paths)} files written to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

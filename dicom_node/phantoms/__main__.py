"""``python -m dicom_node.phantoms OUT_DIR --count N --seed S``: write one phantom study as DICOM files."""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dicom_node.phantoms.dataset import SOP_CLASSES, write_study


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dicom_node.phantoms",
        description="Write synthetic chest radiographs (one study, one series) as DICOM files.",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder for the files (created)")
    parser.add_argument("--count", type=int, default=1, help="number of instances (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first instance (default 0)")
    parser.add_argument("--size", type=int, default=2048, help="rows and columns (default 2048)")
    parser.add_argument("--modality", choices=sorted(SOP_CLASSES), default="CR")
    parser.add_argument("--photometric", choices=("MONOCHROME1", "MONOCHROME2"), default="MONOCHROME2")
    parser.add_argument("--bits-stored", type=int, default=12, choices=range(12, 17), metavar="{12..16}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (2 for bad arguments)."""
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

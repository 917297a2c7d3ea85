"""Serve DICOMweb over an existing data folder in a process of its own, until its standard input
closes: ``python -m tests.dicomweb.serve_process DATA_DIR`` prints the DICOMweb URL, one line.
The memory test measures this process's RSS while a client retrieves from it."""

import sys
from pathlib import Path

from tests.dicomweb.serve import serve_dicomweb


def main() -> None:
    with serve_dicomweb(Path(sys.argv[1])) as (url, _):
        print(url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()

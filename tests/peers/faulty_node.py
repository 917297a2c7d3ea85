"""``python -m tests.peers.faulty_node serve ...``: the node with faults injected, for tests only.

``FAULTY_NODE_FAULTS=encoders`` makes every output builder raise; ``encoders+highdicom`` also
makes highdicom's SR constructor raise, so that even the full "not analysed" report fails and
only the minimal one, built with pydicom alone, can go out.
"""

import os
import sys
from typing import Any, NoReturn

import highdicom as hd

from dicom_node import encode
from dicom_node.cli import main


def _failing(*_: Any, **__: Any) -> NoReturn:
    raise RuntimeError("injected fault")


faults = os.environ.get("FAULTY_NODE_FAULTS", "")
if "encoders" in faults:
    for kind in encode.OUTPUTS:
        encode._BUILDERS[kind] = _failing
if "highdicom" in faults:
    hd.sr.Comprehensive3DSR.__init__ = _failing  # type: ignore[method-assign]

sys.exit(main())

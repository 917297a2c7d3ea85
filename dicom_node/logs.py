"""Logging set-up, called once by the CLI.

Modules log with ``logging.getLogger(__name__)`` and never configure logging
themselves. Log records name UIDs and job ids, never patient names or IDs.
"""

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Send the node's log records to stderr at ``level``.

    pynetdicom's per-PDU debug logging is kept at WARNING: it is verbose,
    slows every association and can print dataset contents.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it narrates every attribute it copies
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its invalid-value warnings quote the value

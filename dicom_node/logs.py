"""Logging set-up, called once by the CLI.

Modules log with ``logging.getLogger(__name__)`` and never configure logging
themselves. Log records name UIDs and job ids, never patient names or IDs.

Libraries' ``warnings.warn`` calls (highdicom's, pydicom's) come through the node's logging
too: one line each, once per distinct message, on the ``py.warnings`` logger, with quoted
values replaced (highdicom's person-name warning quotes the name).
"""

import logging
import re
import sys
import traceback
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
WARNINGS_LOGGER = "py.warnings"
_QUOTED = re.compile(r"(['\"])(.*?)\1")
# what identifies a patient: kept out of every traceback the node logs
_PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs",
                     "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
                     "PatientTelephoneNumbers")


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
    route_library_warnings()


class OncePerMessage(logging.Filter):
    """Lets each distinct message through once; remembers at most ``limit`` of them.

    Python shows a warning once per code location only until any warnings filter changes
    (highdicom and pydicom change them in ``catch_warnings`` blocks), so the same warning came
    out several times per series.
    """

    def __init__(self, limit: int = 1000) -> None:
        super().__init__()
        self.limit = limit
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self._seen:
            return False
        if len(self._seen) < self.limit:
            self._seen.add(text)
        return True


def route_library_warnings() -> None:
    """Make ``warnings.warn`` log on ``py.warnings``: one line each, once per message."""
    target = logging.getLogger(WARNINGS_LOGGER)
    for old in [f for f in target.filters if isinstance(f, OncePerMessage)]:
        target.removeFilter(old)
    target.addFilter(OncePerMessage())
    warnings.showwarning = log_warning


def log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                file: TextIO | None = None, line: str | None = None) -> None:
    """A ``warnings.showwarning`` that logs one line naming the library, without quoted values."""
    text = redact_quoted(" ".join(str(message).split()))
    logging.getLogger(WARNINGS_LOGGER).warning("%s: %s: %s (%s:%d)", _package(filename), category.__name__,
                                               text, Path(filename).name, lineno)


def _package(filename: str) -> str:
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts[:-1]:
            return parts[parts.index(marker) + 1]
    return Path(filename).stem


def redact_quoted(text: str) -> str:
    """``text`` with every quoted string that is not a DICOM keyword replaced by ``'…'``."""
    def keep_keywords(match: re.Match[str]) -> str:
        quote, inside = match.group(1), match.group(2)
        return match.group(0) if tag_for_keyword(inside) is not None else f"{quote}…{quote}"

    return _QUOTED.sub(keep_keywords, text)


def patient_values(datasets: Iterable[Dataset]) -> set[str]:
    """The patient-identifying values of ``datasets`` (and a name's components), for redaction."""
    values: set[str] = set()
    for ds in datasets:
        for keyword in _PATIENT_KEYWORDS:
            value = ds.get(keyword)
            items = value if isinstance(value, list | tuple) else [value]
            for item in (str(v) for v in items if v is not None):
                values.add(item)
                values.update(re.split(r"[\^=]", item))
    return {v.strip() for v in values if len(v.strip()) >= 2}


def redacted_traceback(exc: BaseException, secrets: Iterable[str]) -> str:
    """``exc``'s traceback with each of ``secrets`` (longest first, in any case) replaced by
    ``[redacted]``."""
    text = "".join(traceback.format_exception(exc))
    for secret in sorted(secrets, key=len, reverse=True):
        # whole words only: a short name ("Li") must not mangle the paths around it
        text = re.sub(rf"(?<![^\W_]){re.escape(secret)}(?![^\W_])", "[redacted]", text, flags=re.IGNORECASE)
    return text

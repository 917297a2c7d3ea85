"""Logging set-up, called once by the CLI, and the two guards every peer-facing log line needs.

Modules log with ``logging.getLogger(__name__)`` and never configure logging
themselves. Log records name UIDs and job ids, never patient names or IDs.

- :class:`SafeFormatter` escapes control characters in every record, so a peer that puts a
  newline or an ANSI escape in its AE title cannot forge or hide a log line.
- :class:`PeerLogLimiter` lets through at most N lines per peer per minute and then says once
  how many it held back, so junk connections cannot flood the log.

Libraries' ``warnings.warn`` calls (highdicom's, pydicom's) come through the node's logging
too: one line each, once per distinct message, on the ``py.warnings`` logger, with quoted
values replaced (highdicom's person-name warning quotes the name).
"""

import logging
import re
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
WARNINGS_LOGGER = "py.warnings"
_QUOTED = re.compile(r"(['\"])(.*?)\1")
# what identifies a patient: kept out of every traceback the node logs
_PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs",
                     "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
                     "PatientTelephoneNumbers")

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidirectional overrides
# that terminals and log viewers treat as line breaks or use to reorder text.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")

#: Peers remembered by a :class:`PeerLogLimiter`; beyond this, new peers share one budget.
MAX_PEERS = 4096
_OTHERS = "(other peers)"


def clean_text(value: object) -> str:
    r"""``str(value)`` with every control character escaped (a newline becomes ``\x0a``)."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                       else f"\\u{ord(m.group()):04x}", str(value))


class SafeFormatter(logging.Formatter):
    """A formatter whose output cannot contain a line the program did not write.

    The message is escaped whole (its arguments are where peer data lands). A traceback keeps
    its line breaks but every line of it is indented, so an exception message that holds a
    newline cannot start a line that looks like a record of its own.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = clean_text(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indent(super().formatStack(stack_info))


def _indent(text: str) -> str:
    return "\n".join("  " + clean_text(line) for line in text.split("\n"))


@dataclass
class _Budget:
    window_start: float
    lines: int = 0
    suppressed: int = 0


class PeerLogLimiter:
    """At most ``per_minute`` log lines per peer per minute; the rest are counted, not written.

    When a peer's next minute starts, the first line it logs is preceded by one line saying how
    many were held back. Thread-safe.

    Parameters
    ----------
    logger
        Where the lines go.
    per_minute
        Lines a peer may log in one minute; 0 logs none (but still counts them).
    clock
        Seconds, monotonic; injected for tests.
    """

    def __init__(self, logger: logging.Logger, per_minute: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: dict[str, _Budget] = {}

    def log(self, level: int, peer: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` for ``peer`` if its budget allows; return whether it did.

        A line the logger would not emit at ``level`` anyway spends no budget.
        """
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        with self._lock:
            key, budget = self._budget(peer, now)
            suppressed = 0
            if now - budget.window_start >= 60.0:
                suppressed, budget.suppressed = budget.suppressed, 0
                budget.window_start, budget.lines = now, 0
            allowed = budget.lines < self.per_minute
            if allowed:
                budget.lines += 1
            else:
                budget.suppressed += 1
        if suppressed:
            self.logger.log(level, "suppressed %d log line(s) about %s in the last minute",
                            suppressed, key)
        if allowed:
            self.logger.log(level, msg, *args)
        return allowed

    def _budget(self, peer: str, now: float) -> tuple[str, _Budget]:
        if peer not in self._peers and len(self._peers) >= MAX_PEERS:
            # Forget peers whose minute is over and who have nothing left to report.
            for key, budget in list(self._peers.items()):
                if now - budget.window_start >= 60.0 and not budget.suppressed:
                    del self._peers[key]
            if len(self._peers) >= MAX_PEERS:
                peer = _OTHERS
        return peer, self._peers.setdefault(peer, _Budget(now))


def setup_logging(level: str = "INFO") -> None:
    """Send the node's log records to stderr at ``level``, through :class:`SafeFormatter`.

    pynetdicom's per-PDU debug logging is kept at WARNING: it is verbose,
    slows every association and can print dataset contents.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(_FORMAT))
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


def bare_traceback(exc: BaseException) -> str:
    """``exc``'s stack and type, without its message: a message may quote a data set's value
    (pydicom's "could not convert string to float: '...'"), the frames and the type never do."""
    return "".join(traceback.format_tb(exc.__traceback__)) + type(exc).__qualname__


def redacted_traceback(exc: BaseException, secrets: Iterable[str]) -> str:
    """``exc``'s traceback with each of ``secrets`` (longest first, in any case) replaced by
    ``[redacted]``."""
    text = "".join(traceback.format_exception(exc))
    for secret in sorted(secrets, key=len, reverse=True):
        # whole words only: a short name ("Li") must not mangle the paths around it
        text = re.sub(rf"(?<![^\W_]){re.escape(secret)}(?![^\W_])", "[redacted]", text, flags=re.IGNORECASE)
    return text

"""The audit trail: append-only JSON lines saying what happened to which study, when, by whom.

One event per association accepted or rejected, instance stored, job started and finished
(model, version, weights sha256, methods, output UIDs), result delivered or dead, and operator
action (CLI or web). UIDs, AE titles and addresses only: never patient names or IDs. Files live in
``data_dir/audit/``: ``audit.jsonl`` is written, and rotated by size to ``audit.1.jsonl`` ...
``audit.<backups>.jsonl`` (oldest dropped). Each line is flushed as it is written; the trail is
read back across the rotated files, oldest first, so it survives restarts.
"""

import contextlib
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

logger = logging.getLogger(__name__)

#: The fields that place an event in a study's history.
STUDY = "study_instance_uid"


class Audit(Protocol):
    def record(self, event: str, **fields: Any) -> None: ...


class NoAudit:
    """For code run without a node (tests, ``dicom-node explain``): records nothing."""

    def record(self, event: str, **fields: Any) -> None:
        return None


class Fanout:
    """Several sinks as one: the audit trail and the metrics see the same events."""

    def __init__(self, *sinks: Audit) -> None:
        self.sinks = sinks

    def record(self, event: str, **fields: Any) -> None:
        for sink in self.sinks:
            try:
                sink.record(event, **fields)
            except Exception:  # one sink's trouble never reaches the code that audits, nor the others
                logger.exception("audit sink %s failed on %s", type(sink).__name__, event)


#: The shared do-nothing trail (it holds no state).
NO_AUDIT = NoAudit()


class AuditTrail:
    """The node's audit trail in ``folder``; thread-safe, shared by every part of the node."""

    def __init__(
        self,
        folder: Path,
        max_bytes: int = 10 << 20,
        backups: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.max_bytes, self.backups, self.clock = folder, max_bytes, backups, clock
        self.path = folder / "audit.jsonl"
        self._lock = threading.Lock()
        self.errors = 0
        self._rotate_at = max_bytes
        self._file = _open_unbuffered(self.path)
        if self._size() > 0 and _last_byte(self.path) != b"\n":
            try:
                self._file.write(b"\n")  # end a line cut by a crash, so the next event starts clean
            except OSError as exc:  # a full disk: start anyway, the node must come up to say so
                logger.error("audit trail: %s ends with a cut line: %s", self.path, exc)

    def record(self, event: str, **fields: Any) -> None:
        """Append one event: its time (UTC, ISO 8601), its name, and ``fields``.

        Never raises: what was audited has already happened (an instance stored, a job done), so
        a full disk or a closed file must not turn it into a failure. A write that fails is
        logged and counted in :attr:`errors` (``/metrics``), and leaves nothing of the event in
        the file: an event is either in the trail or counted lost, never both.
        """
        try:
            line = _line(self.clock(), event, fields).encode("utf-8")
            with self._lock:
                size = self._size()
                if size + len(line) > self._rotate_at and size > 0:
                    self._try_rotate(size)
                self._append(line)
        except (OSError, ValueError) as exc:
            self.errors += 1
            logger.error("audit trail: event %s not written: %s", event, exc)

    def _size(self) -> int:
        # not tell(): an operator's CLI command appends to the same file from another process
        return os.fstat(self._file.fileno()).st_size

    def _append(self, line: bytes) -> None:
        _append_whole(self._file, line)

    def _try_rotate(self, size: int) -> None:
        try:
            self._rotate()
            self._rotate_at = self.max_bytes
        except OSError as exc:  # keep appending; try again after another max_bytes
            self.errors += 1
            self._rotate_at = size + self.max_bytes
            logger.error("audit trail: rotation failed, %s keeps growing: %s", self.path, exc)

    def _rotate(self) -> None:
        self._file.close()
        try:
            for n in range(self.backups - 1, 0, -1):
                older = self.folder / f"audit.{n}.jsonl"
                if older.exists():
                    os.replace(older, self.folder / f"audit.{n + 1}.jsonl")
            if self.backups > 0:
                os.replace(self.path, self.folder / "audit.1.jsonl")
            else:
                self.path.unlink()
        finally:  # a failed rotation keeps appending to the current file
            self._file = _open_unbuffered(self.path)

    def close(self) -> None:
        """Close the file; never raises (a node stopping on a full disk still stops cleanly)."""
        with self._lock:
            try:
                self._file.close()  # later events (threads still finishing) are logged as not written
            except OSError as exc:  # a node stopping on a full disk still stops cleanly
                logger.error("audit trail: %s not closed cleanly: %s", self.path, exc)


def job_requeued(job: Any, actor: str) -> tuple[str, dict[str, Any]]:
    """The event of an operator requeueing ``job`` (a jobs.queue.Job), from ``actor`` (cli, web)."""
    return "operator_requeued_job", {
        "actor": actor,
        "job": job.id,
        STUDY: job.study_instance_uid,
        "series_instance_uid": job.series_instance_uid,
    }


def result_retried(record: Any, actor: str) -> tuple[str, dict[str, Any]]:
    """The event of an operator sending an outbox record (export.OutboxRecord) again."""
    return "operator_retried_result", {
        "actor": actor,
        "outbox_record": record.id,
        STUDY: record.study_instance_uid,
        "sop_instance_uid": record.sop_instance_uid,
        "destination": record.destination,
    }


def _append_whole(file: BinaryIO, line: bytes) -> None:
    """Write ``line`` at the end of ``file`` whole, or undo the part a full disk took and raise."""
    start = os.fstat(file.fileno()).st_size
    try:
        written = 0
        while written < len(line):  # a write may take part of the line (a page's slack), then fail
            taken = file.write(line[written:]) or 0
            if taken == 0:  # no progress and no error: as good as a full disk
                raise OSError(errno.ENOSPC, "no byte of the event was written")
            written += taken
    except OSError:
        with contextlib.suppress(OSError):  # shrinking a file needs no space
            os.ftruncate(file.fileno(), start)
        raise


def _open_unbuffered(path: Path) -> BinaryIO:
    """The trail's file: appended to, unbuffered, so each event is one write that succeeds or
    is undone (a buffer would keep a lost event and write it, or half of it, later)."""
    return path.open("ab", buffering=0)


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def _line(now: float, event: str, fields: dict[str, Any]) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    return json.dumps({"time": stamp, "event": event, **fields}, default=str) + "\n"


def append_event(folder: Path, event: str, **fields: Any) -> None:
    """One event from another process (an operator's CLI command): appended in one write, never
    rotating (the node rotates); small appends to a local file do not interleave.

    Raises
    ------
    OSError
        The event was not written (a full disk); nothing of it is left in the file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with _open_unbuffered(folder / "audit.jsonl") as fh:
        _append_whole(fh, _line(time.time(), event, fields).encode("utf-8"))


def read_events(folder: Path) -> Iterator[dict[str, Any]]:
    """Every event in ``folder``, oldest first (rotated files first); damaged lines are skipped."""
    rotated = sorted(folder.glob("audit.*.jsonl"), key=lambda p: int(p.name.split(".")[1]), reverse=True)
    for path in [*rotated, folder / "audit.jsonl"]:
        if not path.is_file():
            continue
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash


def study_history(folder: Path, study_uid: str) -> list[dict[str, Any]]:
    """The events of one study, oldest first."""
    return [e for e in read_events(folder) if e.get(STUDY) == study_uid]


class AppendingAudit:
    """An :class:`Audit` for another process than the node (``dicom-node purge``): each event is
    appended with :func:`append_event`; one the disk refuses is logged and counted, never raised
    (what it records has been done)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.errors = 0

    def record(self, event: str, **fields: Any) -> None:
        try:
            append_event(self.folder, event, **fields)
        except OSError as exc:
            self.errors += 1
            logger.error("audit trail: event %s not written: %s", event, exc)

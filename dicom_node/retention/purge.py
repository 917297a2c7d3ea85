"""Deleting what the policy lets go, so that a kill at any moment leaves nothing dangling.

Order, for each batch of candidates:

1. their *intents* are committed (table ``purge_intents``, component ``retention`` of the node's
   database): what is to go, where, and the copy it is (an input's arrival time, a result file's
   inode and modification time);
2. each one goes: an input's index record in one transaction (only if it is still the copy the
   plan read), then its file, then its folders if empty; a result's outbox records in one
   transaction (only if still settled and unchanged), then its file (only if still the same
   inode and time);
3. the deletion is audited and its intent deleted.

A process killed anywhere in 2 leaves an intent whose index record may be gone while its file is
still there (a stray file). :meth:`Purger.resume` finishes, at the next start (before the store
checks its files against its index, which would otherwise index the stray file again) and before
each age round, only the intents whose deletion had begun: an input whose index record is gone
(or whose file is, after a power cut), a result whose outbox records and file are both gone
(audited). An intent where nothing was deleted yet is dropped: the rules are checked again by the
next plan, since a job may have come to use the input meanwhile; so is a result file still there
without outbox records (the next plan finds it settled, "no destination"). A deletion the file
system refuses (EACCES, EIO...) keeps its intent, is logged and tried again; it never stops the
others or the node. A kill between 3's
audit and the intent's deletion audits that deletion again on resume: an event may be written
twice, never lost.
"""

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dicom_node.audit import NO_AUDIT, Audit
from dicom_node.export.outbox import SETTLED, Outbox
from dicom_node.retention.rules import Candidate, Kind, age_days
from dicom_node.store import InstanceStore
from dicom_node.store.db import SchemaError, connect, migrate, transaction
from dicom_node.store.index import InstanceRecord
from dicom_node.store.results import ResultArea, ResultFile

logger = logging.getLogger(__name__)

_MIGRATIONS = (
    """
    CREATE TABLE purge_intents (
        kind TEXT NOT NULL,
        sop_instance_uid TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        path TEXT NOT NULL,
        since REAL NOT NULL,
        size_bytes INTEGER NOT NULL,
        identity TEXT NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (kind, sop_instance_uid, path)
    )
    """,
)
_COLUMNS = ("kind, sop_instance_uid, study_instance_uid, series_instance_uid, path, since, size_bytes, "
            "identity, reason")
#: The audit event of every deletion.
PURGED = "retention_purged"


@dataclass(frozen=True)
class Intent:
    """A deletion committed to before it is done (one row of ``purge_intents``)."""

    kind: Kind
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: str  # an input's path below instances/, a result's absolute path
    since: float
    size_bytes: int
    identity: str  # JSON: an input's whole index record, a result's [inode, mtime_ns]
    reason: str


@dataclass
class Outcome:
    """What a purge did: deletions by kind and bytes, and the candidates that changed meanwhile."""

    purged: dict[Kind, int] = field(default_factory=lambda: {Kind.INPUT: 0, Kind.RESULT: 0})
    bytes: int = 0
    changed: int = 0  # received again, re-run or re-queued since the plan: left alone
    failed: int = 0  # refused by the file system: the intent stays and is tried again
    replanned: int = 0  # interrupted before anything was deleted: left to the next plan
    done: list["Intent"] = field(default_factory=list)

    def add(self, other: "Outcome") -> None:
        for kind, count in other.purged.items():
            self.purged[kind] += count
        self.bytes += other.bytes
        self.changed += other.changed
        self.failed += other.failed
        self.replanned += other.replanned
        self.done += other.done


class Purger:
    """Executes purges and finishes interrupted ones.

    Parameters
    ----------
    database
        The node's database file (the intents live there, component ``retention``).
    store, outbox, results
        The owners of what is deleted; each deletes its own records and files.
    audit
        Where each deletion is recorded.
    clock
        Seconds since the epoch (the ages in audit events).
    actor
        Who purges, in audit events: ``node`` or ``cli``.
    """

    def __init__(self, database: Path, store: InstanceStore, outbox: Outbox, results: ResultArea,
                 audit: Audit = NO_AUDIT, clock: Callable[[], float] | None = None,
                 actor: str = "node") -> None:
        # NORMAL: deleting a finished intent need not reach the disk at once (redoing it is harmless);
        # the intents themselves are committed with FULL (see execute)
        self._conn = connect(database, synchronous="NORMAL")
        migrate(self._conn, "retention", _MIGRATIONS)
        self.store, self.outbox, self.results, self.audit = store, outbox, results, audit
        self.clock = clock if clock is not None else store.clock
        self.actor = actor
        # deletions audited whose intent is not deleted yet (its transaction failed): resuming
        # them in this process must not audit, nor count in the metrics, the same deletion twice
        self._audited: set[tuple[str, str, str]] = set()

    def close(self) -> None:
        self._conn.close()

    def execute(self, batch: list[Candidate]) -> Outcome:
        """Delete ``batch`` (intents first, see the module's docstring)."""
        intents = [_intent(c) for c in batch]
        # On disk before any deletion, even through a power cut: the index's own deletions are
        # committed with synchronous=NORMAL and may be lost while the unlinked files stay gone.
        self._conn.execute("PRAGMA synchronous=FULL")
        try:
            with transaction(self._conn) as conn:
                conn.executemany(f"INSERT OR REPLACE INTO purge_intents ({_COLUMNS}) VALUES "
                                 f"({', '.join('?' * 9)})", [_row(i) for i in intents])
        finally:
            self._conn.execute("PRAGMA synchronous=NORMAL")
        outcome = Outcome()
        for intent in intents:
            self._finish(intent, outcome, resuming=False)
        return outcome

    def pending(self) -> list[Intent]:
        """Intents left by a purge that did not finish."""
        return _pending(self._conn)

    def resume(self) -> Outcome:
        """Finish the deletions an interrupted purge had begun, drop the intents where nothing was
        deleted yet (the next plan checks the rules again); call at start-up, before the store's
        :meth:`~dicom_node.store.InstanceStore.recover`, and before each age round. A deletion
        the file system refuses keeps its intent: it is counted in ``failed``, never raised."""
        outcome = Outcome()
        left = self.pending()
        for intent in left:
            self._finish(intent, outcome, resuming=True)
        if left:
            logger.info("resumed %d deletion(s) of an interrupted purge: %d done, %d left to the next plan, "
                        "%d failed", len(left), len(outcome.done), outcome.replanned, outcome.failed)
        return outcome

    def _finish(self, intent: Intent, outcome: Outcome, resuming: bool) -> None:
        key = (str(intent.kind), intent.sop_instance_uid, intent.path)
        if resuming and key in self._audited:
            self._forget(intent)  # done and audited by this process already
            return
        if resuming and not self._begun(intent):
            outcome.replanned += 1
            self._forget(intent)
            return
        try:
            done = (self._input(intent, resuming) if intent.kind == Kind.INPUT
                    else self._result(intent))
        except OSError as exc:
            # EACCES, EPERM, EIO: the intent stays, so the deletion is tried again by the next
            # resume; the other deletions go on. The file name is a UID, but say only the UIDs.
            logger.warning("retention: cannot delete %s %s of study %s (%s); tried again later",
                           intent.kind, intent.sop_instance_uid, intent.study_instance_uid,
                           exc.strerror or type(exc).__name__)
            outcome.failed += 1
            return
        if done:
            outcome.purged[intent.kind] += 1
            outcome.bytes += intent.size_bytes
            outcome.done.append(intent)
            self.audit.record(PURGED, kind=str(intent.kind), sop_instance_uid=intent.sop_instance_uid,
                              study_instance_uid=intent.study_instance_uid,
                              series_instance_uid=intent.series_instance_uid,
                              age_days=round(age_days(self.clock(), intent.since), 3),
                              size_bytes=intent.size_bytes, reason=intent.reason, actor=self.actor,
                              **({"resumed": True} if resuming else {}))
            self._audited.add(key)
        else:
            outcome.changed += 1
        self._forget(intent)

    def _forget(self, intent: Intent) -> None:
        with transaction(self._conn) as conn:
            conn.execute("DELETE FROM purge_intents WHERE kind = ? AND sop_instance_uid = ? AND path = ?",
                         (intent.kind, intent.sop_instance_uid, intent.path))
        self._audited.discard((str(intent.kind), intent.sop_instance_uid, intent.path))

    def _begun(self, intent: Intent) -> bool:
        """Whether an interrupted deletion had deleted anything: an input's index record (or,
        after a power cut lost that deletion, its file), a result's outbox records."""
        if intent.kind == Kind.INPUT:
            record = InstanceRecord(**json.loads(intent.identity))
            current = self.store.index.get(record.sop_instance_uid)
            intact = current is not None and (current.path, current.received_at) == (
                record.path, record.received_at)
            return not intact or not self.store.path_of(record).is_file()
        if self.outbox.for_instances([intent.sop_instance_uid]).get(intent.sop_instance_uid):
            return False  # forgetting them is all or none: none was forgotten (or a re-run queued new)
        # no records: forgotten, or a result no destination was asked to take; only a file
        # already gone tells the first for sure (a file still there goes by the next plan)
        return not Path(intent.path).exists()

    def _input(self, intent: Intent, resuming: bool) -> bool:
        record = InstanceRecord(**json.loads(intent.identity))
        return self.store.remove(record, resuming=resuming)

    def _result(self, intent: Intent) -> bool:
        """The outbox records, if all still settled, then the file, if still the same copy."""
        current = self.outbox.for_instances([intent.sop_instance_uid]).get(intent.sop_instance_uid, [])
        if any(r.state not in SETTLED for r in current) or not self.outbox.forget(current):
            return False  # queued again (a newer job, an operator's retry): the file stays for it
        inode, mtime_ns = json.loads(intent.identity)
        found = ResultFile(Path(intent.path), intent.study_instance_uid, intent.series_instance_uid,
                           intent.sop_instance_uid, intent.since, intent.size_bytes, (inode, mtime_ns))
        return self.store.remove_result(found)


def _pending(conn: sqlite3.Connection) -> list[Intent]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM purge_intents ORDER BY since").fetchall()
    return [Intent(Kind(r[0]), *r[1:]) for r in rows]


def read_pending(database: Path) -> list[Intent]:
    """The intents of an interrupted purge, read without writing (``purge --dry-run``, tests);
    none where no purge ever ran."""
    conn = connect(database, read_only=True)
    try:
        migrate(conn, "retention", _MIGRATIONS)
    except SchemaError:
        conn.close()
        return []
    try:
        return _pending(conn)
    finally:
        conn.close()


def _intent(c: Candidate) -> Intent:
    if c.kind == Kind.INPUT:
        assert c.instance is not None
        path, identity = c.instance.path, json.dumps(asdict(c.instance))
    else:
        assert c.result is not None
        path, identity = str(c.result.path), json.dumps(list(c.result.identity))
    return Intent(c.kind, c.sop_instance_uid, c.study_instance_uid, c.series_instance_uid, path, c.since,
                  c.size_bytes, identity, c.reason)


def _row(i: Intent) -> tuple[object, ...]:
    return (str(i.kind), i.sop_instance_uid, i.study_instance_uid, i.series_instance_uid, i.path, i.since,
            i.size_bytes, i.identity, i.reason)


def batches(candidates: Iterator[Candidate], size: int) -> Iterator[list[Candidate]]:
    """``candidates`` in lists of up to ``size``."""
    batch: list[Candidate] = []
    for candidate in candidates:
        batch.append(candidate)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch

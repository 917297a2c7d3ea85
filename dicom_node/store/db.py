"""The node's SQLite database: one file, ``<data_dir>/index.sqlite``, shared by the store's index,
the job queue and the outbox. Each component migrates its own tables.

Writers (the node) open it with :func:`connect`; readers that must never write (the CLI's list
and show commands, the dashboard) open it with :func:`connect` ``read_only=True``: no migration,
no WAL set-up, no checkpoint, so they work on a full disk and never change the schema.
"""

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from dicom_node.errors import DicomNodeError

DATABASE_NAME = "index.sqlite"
#: Record ids (jobs, outbox records) are SQLite rowids: 1 .. 2**63-1.
MAX_RECORD_ID = 2**63 - 1

#: One schema version: an SQL script (statements separated by ``;``), or a function for what SQL
#: alone cannot do (recomputing a hash); either runs inside the migration's transaction.
Migration = str | Callable[[sqlite3.Connection], None]


class DatabaseError(DicomNodeError):
    """The database cannot be used as asked: missing, unreadable, or at another schema version.

    The message is one line naming the file and what to do.
    """


class SchemaError(DatabaseError, RuntimeError):
    """A component's tables are at a schema version this software cannot use (a ``RuntimeError``
    too, as before this class existed)."""


def parse_record_id(text: str) -> int:
    """A record id typed by a user (CLI argument, URL path), checked before it reaches SQLite
    (which raises ``OverflowError`` beyond 64 bits).

    Raises
    ------
    ValueError
        Not a decimal number from 1 to :data:`MAX_RECORD_ID`; the message is short and quotes
        at most 24 characters of ``text``.
    """
    digits = text.isascii() and text.isdigit()
    if not digits or len(text) > 19 or not 0 < int(text) <= MAX_RECORD_ID:
        raise ValueError(f"expected a record id from 1 to {MAX_RECORD_ID}, not {text[:24]!r}")
    return int(text)


def connect(path: Path, synchronous: str = "FULL", *, read_only: bool = False) -> sqlite3.Connection:
    """Open the database in autocommit mode (explicit ``BEGIN``), shareable by threads.

    Parameters
    ----------
    path
        The database file.
    synchronous
        ``"FULL"`` makes every commit survive a power cut; ``"NORMAL"`` (in WAL mode) survives a
        crash of the process but may lose the last commits on a power cut. Ignored when
        ``read_only``.
    read_only
        Open without ever writing (see :func:`connect_read_only`).

    Raises
    ------
    DatabaseError
        ``read_only`` and the file is missing or cannot be opened.
    """
    if read_only:
        return connect_read_only(path)
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
    conn = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER)"
    )
    return conn


#: The errors of a reader that could not create or size the shared-memory file.
_NO_SHARED_MEMORY = frozenset({sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN,
                               sqlite3.SQLITE_READONLY})


def connect_read_only(path: Path, timeout: float = 10.0) -> sqlite3.Connection:
    """Open an existing database for reading only (SQLite ``mode=ro`` and ``query_only``).

    A reader of a WAL database needs its shared-memory file; when no process has the database
    open, SQLite creates that file, which fails on a full disk ("disk I/O error"). If so, and
    no write-ahead log holds commits the database file lacks, the file is complete and is read
    as ``immutable`` (no locks, no shared memory).

    Raises
    ------
    DatabaseError
        The file is missing or cannot be opened for reading.
    """
    if not path.is_file():
        raise DatabaseError(f"{path}: no database (has the node run with this data_dir?)")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        conn = _open_uri(uri, timeout)
    except sqlite3.Error as exc:
        wal = path.with_name(path.name + "-wal")
        # not for "locked" or "busy": a writer is at work, and a file read past it may be torn
        no_space = (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _NO_SHARED_MEMORY
        if not no_space or (wal.exists() and wal.stat().st_size > 0):
            raise DatabaseError(f"{path}: cannot be opened for reading: {exc}") from None
        try:
            conn = _open_uri(uri + "&immutable=1", timeout)
        except sqlite3.Error as again:
            raise DatabaseError(f"{path}: cannot be opened for reading: {again}") from None
    return conn


def _open_uri(uri: str, timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA query_only=1")  # a second lock: no statement of ours can write
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()  # opening is lazy: read now
    except BaseException:
        conn.close()
        raise
    return conn


def is_read_only(conn: sqlite3.Connection) -> bool:
    """Whether ``conn`` was opened by :func:`connect_read_only`."""
    return bool(conn.execute("PRAGMA query_only").fetchone()[0])


def schema_version(conn: sqlite3.Connection, component: str) -> int:
    """The schema version of ``component``'s tables; 0 if it has none yet."""
    try:
        row = conn.execute(
            "SELECT version FROM schema_versions WHERE component = ?", (component,)
        ).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return 0
        raise
    return int(row[0]) if row else 0


@contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[sqlite3.Connection]:
    """The node's one transaction helper: ``begin``, then COMMIT, or ROLLBACK on any exception.

    SQLite rolls back by itself when a COMMIT fails (a full disk); the ROLLBACK is then skipped,
    so the caller sees the real error, not "cannot rollback - no transaction is active".
    """
    conn.execute(begin)
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def migrate(conn: sqlite3.Connection, component: str, migrations: Sequence[Migration]) -> None:
    """Run the steps of ``migrations`` that ``component``'s tables have not had yet, all in one
    transaction: a failed upgrade leaves the file as it was.

    On a read-only connection nothing runs: the tables must already be at this software's
    version. Nothing is written when they are (a component opened again writes nothing).

    Raises
    ------
    SchemaError
        The tables are newer than this software, or (read-only) older than it.
    """
    if _check_version(conn, component, len(migrations)):
        return
    with transaction(conn):
        if _check_version(conn, component, len(migrations)):  # another process migrated meanwhile
            return
        for step in migrations[schema_version(conn, component):]:
            if callable(step):
                step(conn)
                continue
            for statement in step.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO schema_versions VALUES (?, ?)", (component, len(migrations))
        )


def _check_version(conn: sqlite3.Connection, component: str, current: int) -> bool:
    """True if ``component`` is at ``current``; raises if it never can be from here."""
    version = schema_version(conn, component)
    if version > current:
        raise SchemaError(
            f"{_file(conn)}: {component} tables are at schema version {version}, newer than this software "
            f"({current}); upgrade dicom-node"
        )
    if version < current and is_read_only(conn):
        raise SchemaError(
            f"{_file(conn)}: {component} tables are at schema version {version}, older than this software "
            f"({current}); start `dicom-node serve` once to migrate them"
        )
    return version == current


def database_file(conn: sqlite3.Connection) -> Path | None:
    """The file of ``conn``'s main database; None for an in-memory one."""
    name = conn.execute("PRAGMA database_list").fetchone()[2]
    return Path(name) if name else None


def _file(conn: sqlite3.Connection) -> str:
    """The file of ``conn``'s main database, for messages."""
    return str(database_file(conn) or "database")

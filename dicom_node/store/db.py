"""The node's SQLite database: one file, ``<data_dir>/index.sqlite``, shared by the store's index,
the job queue and (later) the outbox. Each component migrates its own tables."""

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

DATABASE_NAME = "index.sqlite"

#: One schema version: an SQL script (statements separated by ``;``), or a function for what SQL
#: alone cannot do (recomputing a hash); either runs inside the migration's transaction.
Migration = str | Callable[[sqlite3.Connection], None]


def connect(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open the database in WAL mode, in autocommit mode (explicit ``BEGIN``), shareable by threads.

    ``synchronous="FULL"`` makes every commit survive a power cut; ``"NORMAL"`` (in WAL mode)
    survives a crash of the process but may lose the last commits on a power cut.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
    conn = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER)"
    )
    return conn


def migrate(conn: sqlite3.Connection, component: str, migrations: Sequence[Migration]) -> None:
    """Run the steps of ``migrations`` that ``component``'s tables have not had yet, all in one
    transaction: a failed upgrade leaves the file as it was."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute(
            "SELECT version FROM schema_versions WHERE component = ?", (component,)
        ).fetchone()
        version = row[0] if row else 0
        if version > len(migrations):
            raise RuntimeError(
                f"{component} tables are at schema version {version}, newer than this software "
                f"({len(migrations)}); upgrade dicom-node"
            )
        for step in migrations[version:]:
            if callable(step):
                step(conn)
                continue
            for statement in step.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO schema_versions VALUES (?, ?)", (component, len(migrations))
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise

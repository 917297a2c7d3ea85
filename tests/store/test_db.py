"""The database helper: migrations write only when there is something to migrate, and read-only
connections never write, even on a full disk."""

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.store.db import DatabaseError, SchemaError, connect, connect_read_only, migrate

MIGRATIONS = ("CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT)",)


def _database(path: Path, rows: int = 3) -> None:
    conn = connect(path)
    migrate(conn, "things", MIGRATIONS)
    conn.executemany("INSERT INTO things (name) VALUES (?)", [(f"n{i}",) for i in range(rows)])
    conn.close()


def test_migrating_current_tables_writes_nothing(tmp_path: Path) -> None:
    _database(tmp_path / "db.sqlite")
    conn = connect(tmp_path / "db.sqlite")
    before = conn.total_changes
    migrate(conn, "things", MIGRATIONS)
    assert conn.total_changes == before
    with pytest.raises(SchemaError, match="newer than this software"):
        migrate(conn, "things", ())
    conn.close()


def test_a_read_only_connection_refuses_writes_and_migrations(tmp_path: Path) -> None:
    _database(tmp_path / "db.sqlite")
    conn = connect(tmp_path / "db.sqlite", read_only=True)
    assert conn.execute("SELECT COUNT(*) FROM things").fetchone()[0] == 3
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("INSERT INTO things (name) VALUES ('x')")
    migrate(conn, "things", MIGRATIONS)  # current: fine
    with pytest.raises(SchemaError, match="older than this software"):
        migrate(conn, "things", (*MIGRATIONS, "ALTER TABLE things ADD COLUMN size INTEGER"))
    conn.close()
    with pytest.raises(DatabaseError, match="no database"):
        connect_read_only(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()


#: Run in a child whose writes cannot grow any file (RLIMIT_FSIZE = 0): what a full disk does to
#: SQLite's shared-memory file, without needing a full disk.
_NO_SPACE_READ = """
import resource, signal, sqlite3, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
from dicom_node.store.db import DatabaseError, connect_read_only
path = Path(sys.argv[1])
try:
    sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("SELECT 1 FROM things").fetchall()
    print("plain ro: ok")
except sqlite3.Error as exc:
    print("plain ro:", exc)
try:
    print("rows:", connect_read_only(path).execute("SELECT COUNT(*) FROM things").fetchone()[0])
except DatabaseError as exc:
    print("refused:", exc)
"""


def _read_without_space(path: Path) -> str:
    result = subprocess.run([sys.executable, "-c", _NO_SPACE_READ, str(path)], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[2], check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_closed_database_is_read_on_a_full_disk(tmp_path: Path) -> None:
    _database(tmp_path / "db.sqlite")  # closed: no -shm, no -wal; SQLite must create them to read
    out = _read_without_space(tmp_path / "db.sqlite")
    assert "plain ro: disk I/O error" in out  # why the fallback exists
    assert "rows: 3" in out


def test_commits_only_in_a_leftover_log_are_not_read_past(tmp_path: Path) -> None:
    """After a crash the write-ahead log may hold commits the file lacks: reading the file alone
    would show an old state, so the reader refuses with one line instead."""
    source = tmp_path / "live.sqlite"
    conn = connect(source)
    migrate(conn, "things", MIGRATIONS)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("INSERT INTO things (name) VALUES ('only in the log')")
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal"):  # the files a kill -9 leaves, without the shared memory
        shutil.copy(f"{source}{suffix}", crashed / f"db.sqlite{suffix}")
    conn.close()
    out = _read_without_space(crashed / "db.sqlite")
    assert "refused:" in out and "cannot be opened for reading" in out

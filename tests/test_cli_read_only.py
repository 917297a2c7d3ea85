"""The CLI's reading commands never write the database: no migration, no checkpoint, and a
one-line answer when the database is missing or at another schema version."""

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.store.db import DATABASE_NAME
from tests.web.inprocess import make_database


def _config(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\n')
    return config, data


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reading_commands_leave_the_database_file_as_it_was(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config, data = _config(tmp_path)
    make_database(data)
    before = _digest(data / DATABASE_NAME)
    for command in (["jobs", "list"], ["jobs", "show", "1"], ["outbox", "list"]):
        assert main([*command, "--config", str(config)]) == 0, command
    out = capsys.readouterr().out
    assert "not a chest radiograph" in out and "outbox: 1 pending" in out
    assert _digest(data / DATABASE_NAME) == before
    wal = data / (DATABASE_NAME + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # nothing written through the log either


@pytest.mark.parametrize(("version", "says"), [(99, "newer than this software"), (0, "older than this software")])
def test_another_schema_version_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            version: int, says: str) -> None:
    config, data = _config(tmp_path)
    make_database(data)
    with sqlite3.connect(data / DATABASE_NAME) as conn:
        conn.execute("UPDATE schema_versions SET version = ? WHERE component = 'jobs'", (version,))
    conn.close()
    before = _digest(data / DATABASE_NAME)
    assert main(["jobs", "list", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert says in err and DATABASE_NAME in err and err.count("\n") == 1 and "Traceback" not in err
    assert _digest(data / DATABASE_NAME) == before  # a reader never migrates


def test_a_missing_database_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, data = _config(tmp_path)
    assert main(["outbox", "list", "--config", str(config)]) == 0
    assert "has no database yet" in capsys.readouterr().out
    assert main(["jobs", "show", "1", "--config", str(config)]) == 1
    assert not data.exists()  # looking created nothing


@pytest.mark.parametrize("bad", ["10000000000000000000000", "0", "-1", "1e3", "x"])
def test_an_id_out_of_range_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    config, _ = _config(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["jobs", "show", bad, "--config", str(config)])
    assert exit_.value.code == 2 and "expected a record id" in capsys.readouterr().err


def test_an_operator_action_on_a_full_disk_says_what_happened_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, data = _config(tmp_path)
    make_database(data)
    (data / "audit").mkdir()
    (data / "audit" / "audit.jsonl").symlink_to("/dev/full")  # every audit write: ENOSPC
    assert main(["jobs", "requeue", "1", "--config", str(config)]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after the log line saying it was requeued
    assert last == "dicom-node: done, but its audit event operator_requeued_job was not written: " \
                   "No space left on device"
    assert main(["jobs", "list", "--state", "queued", "--config", str(config)]) == 0
    assert "not a chest radiograph" not in capsys.readouterr().out  # requeued: the reason is cleared


_WRITE_WITHOUT_SPACE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
from dicom_node.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_write_command_on_a_full_disk_fails_in_one_line(tmp_path: Path) -> None:
    config, data = _config(tmp_path)
    make_database(data)
    result = subprocess.run([sys.executable, "-c", _WRITE_WITHOUT_SPACE, "jobs", "requeue", "1", "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1], check=False)
    assert result.returncode == 1 and result.stderr.startswith("dicom-node: database error: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr

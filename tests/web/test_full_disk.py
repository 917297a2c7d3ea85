"""A node on a truly full file system is not blind: ``/readyz`` says why it refuses stores,
the read-only CLI commands still answer, and ``/metrics`` counts the audit events it lost.

The data folder is a small tmpfs this test mounts (CI runs as root) and fills to the last
byte. Where mounting is not allowed (not root, no CAP_SYS_ADMIN) the same checks run on a
simulated full disk instead: a floor above the free space, the audit trail written to
``/dev/full`` (every write fails with ENOSPC) and CLI commands under ``RLIMIT_FSIZE = 0``
(every write that grows a file fails).
"""

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dicom_node.audit import read_events
from tests.nodeproc import REPO, NodeProcess, echo_ok
from tests.web.inprocess import make_database

FLOOR = 1 << 20  # store.min_free_space: 1 MiB


@contextmanager
def small_filesystem(folder: Path, size: str = "16m", mount: bool = True) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` on ``folder``; yields False (nothing mounted) where not allowed
    or not ``mount``."""
    folder.mkdir(parents=True)
    mounted = mount and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
        capture_output=True, check=False,
    ).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Write a file until the file system has no byte left."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for block in (1 << 20, 4096, 1):  # big blocks, then the last pages, then the last bytes
            while True:
                try:
                    os.write(fd, b"\0" * block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)


def _no_growing_writes() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def cli(config: Path, *args: str, simulated: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False,
        preexec_fn=_no_growing_writes if simulated else None,
    )


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check_read_only_commands(config: Path, simulated: bool, every: bool = True) -> None:
    """The reading commands answer; ``every``: also those that never open the database."""
    jobs = cli(config, "jobs", "list", simulated=simulated)
    assert jobs.returncode == 0 and "not a chest radiograph" in jobs.stdout, jobs.stderr
    outbox = cli(config, "outbox", "list", simulated=simulated)
    assert outbox.returncode == 0 and "outbox: 1 " in outbox.stdout, outbox.stderr
    if not every:
        return
    shown = cli(config, "jobs", "show", "1", simulated=simulated)
    assert shown.returncode == 0 and "time collect" in shown.stdout, shown.stderr
    models = cli(config, "models", "list", simulated=simulated)
    assert models.returncode == 0, models.stderr
    audit = cli(config, "audit", "--study", "1.2.3", simulated=simulated)  # a study with no events
    assert audit.returncode == 1 and audit.stdout == "no audit events for study 1.2.3\n", audit.stderr


def associations_kept(data_dir: Path, mounted: bool) -> int:
    """Association events in the audit trail (none on /dev/full, which reads as endless zeros)."""
    if not mounted:
        return 0
    return sum(e["event"] == "association_accepted" for e in read_events(data_dir / "audit"))


def associations_lost(log: Path) -> int:
    return len(re.findall("event association_accepted not written", log.read_text()))


def lost_in_log(log: Path) -> int:
    return len(re.findall(r"audit trail: event \S+ not written", log.read_text()))


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])  # tmpfs falls back to simulated where it must
def test_a_node_on_a_full_disk_says_so_and_its_cli_still_reads(tmp_path: Path, disk: str) -> None:
    folder = tmp_path / "node"
    with small_filesystem(folder / "data", mount=disk == "tmpfs") as mounted:
        node = NodeProcess(folder)
        make_database(node.data_dir)
        floor = FLOOR if mounted else 2**62  # simulated: a floor above any disk's free space
        node.config.write_text(node.config.read_text().replace("min_free_space = 0", f"min_free_space = {floor}"))
        if not mounted:
            (node.data_dir / "audit").mkdir()
            (node.data_dir / "audit" / "audit.jsonl").symlink_to("/dev/full")
        base = f"http://127.0.0.1:{node.web_port}"
        with node:
            if mounted:
                assert http_get(base + "/readyz") == (200, b"ready\n")
                fill(node.data_dir)
                assert os.statvfs(node.data_dir).f_bavail == 0
            status, body = http_get(base + "/readyz")
            assert status == 503 and body.startswith(b"not ready: below min_free_space: "), body
            status, body = http_get(base + "/readyz", {"Accept": "application/json"})
            answer = json.loads(body)
            assert answer["free_bytes"] < answer["min_free_space"] == floor
            status, page = http_get(base + "/")  # the overview says it too
            assert status == 200 and b"Not ready:</b> below min_free_space" in page
            kept_before, lost_before = associations_kept(node.data_dir, mounted), associations_lost(node.log)
            for _ in range(40):  # associations are audited: ~6 KB of events, more than a page's slack
                assert echo_ok(node.port)
            check_read_only_commands(node.config, simulated=not mounted)
            status, body = http_get(base + "/metrics")
            [line] = [x for x in body.decode().splitlines()
                      if x.startswith("dicom_node_audit_write_errors_total ")]
            lost = int(float(line.split()[1]))  # Prometheus writes counters as floats
            assert lost > 0 and lost == lost_in_log(node.log)
            # each association is in the trail or counted lost, never both
            kept = associations_kept(node.data_dir, mounted) - kept_before
            assert kept + associations_lost(node.log) - lost_before == 40
            assert node.stop(timeout=60) == 0
        if mounted:  # the stopped node removed its write-ahead log: full again, to the last byte
            fill(node.data_dir)
            assert os.statvfs(node.data_dir).f_bavail == 0
        check_read_only_commands(node.config, not mounted, every=False)  # no node holds the database now
        print(f"full disk {'tmpfs (real)' if mounted else 'simulated'}: {lost} audit events lost and counted")

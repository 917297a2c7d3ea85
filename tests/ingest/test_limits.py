"""Bounded memory per association, measured on a real ``dicom-node serve`` process.

The attacks of issue #12: a PDU header announcing 4 GiB, a C-STORE that never ends, sixteen of
those at once. Each test clears the node's peak-RSS mark (``/proc/PID/clear_refs``), attacks,
and reads the new peak (``VmHWM``); limits are small (4 MiB instances, 1 MiB spool threshold)
so every attack is over in seconds.
"""

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.factories import ct_dataset
from tests.ingest.attacker import LAST, Attacker, p_data, store_command
from tests.malformed import body
from tests.nodeproc import CONFIG, NodeProcess, echo_ok, free_port

MiB = 2**20
MAX_INSTANCE = 4 * MiB
SPOOL_THRESHOLD = 1 * MiB
MAX_PDU = 131072
#: Peak memory one association may add (docs/performance.md): two data sets in memory at most
#: (one handled, one queued or being received), each up to spool_threshold in a BytesIO that
#: may briefly need twice that while it grows, plus about 1 MiB of PDU buffers, thread, objects.
PER_ASSOCIATION_PEAK = 4 * SPOOL_THRESHOLD + 1 * MiB
ATTACK_BYTES = 64 * MiB  # how much an attacker tries to push before giving up
ATTACK_SECONDS = 15.0
# acse_timeout: an association aborted before its A-ASSOCIATE-RQ keeps its thread until then
# max_associations_per_host: the sixteen associations of one test all come from 127.0.0.1
LIMITS = f"""max_associations = 20
max_associations_per_host = 20
acse_timeout = 3
max_pdu_size = {MAX_PDU}
max_instance_size = {MAX_INSTANCE}
spool_threshold = {SPOOL_THRESHOLD}
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("limits")
    config = CONFIG.format(grace=2, web_port=free_port())
    (folder / "node.toml").write_text(config.replace("[ingest]\n", "[ingest]\n" + LIMITS, 1))
    with NodeProcess(folder) as proc:
        yield proc
        proc.stop()


def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class PeakRss:
    """The growth of a process's peak RSS over a ``with`` block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth = 0

    def __enter__(self) -> "PeakRss":
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # peak := current RSS
        self.before = _status(self.pid)["VmRSS"]
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = _status(self.pid)["VmHWM"] - self.before


def _pid(node: NodeProcess) -> int:
    assert node.proc is not None
    return node.proc.pid


def _socket_buffers() -> int:
    """The most the kernel may hold between the attacker's writes and the node's reads."""
    rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return rmem + wmem


def _flood(attacker: Attacker, chunk: bytes) -> None:
    """Send ``chunk`` until the node answers or closes, within the attack's budget."""
    deadline = time.monotonic() + ATTACK_SECONDS
    while (attacker.sent < ATTACK_BYTES and time.monotonic() < deadline
           and not attacker.readable() and attacker.send(chunk)):
        pass


@pytest.mark.parametrize("when", ["P-DATA-TF after association", "A-ASSOCIATE-RQ"])
def test_oversized_pdu_header_is_aborted_before_its_body(node: NodeProcess, when: str) -> None:
    with PeakRss(_pid(node)) as peak, Attacker(node.port) as attacker:
        if when == "A-ASSOCIATE-RQ":
            attacker.send(b"\x01\x00\xff\xff\xff\xff")  # type 1, length 4 GiB
        else:
            attacker.associate(CTImageStorage, ExplicitVRLittleEndian)
            attacker.send(b"\x04\x00\xff\xff\xff\xff")  # type 4, length 4 GiB
        _flood(attacker, bytes(65536))
        answer = attacker.read(5.0)
        assert answer is None or answer.pdu_type == 0x07  # A-ABORT, or closed at once
        assert attacker.read(5.0) is None and attacker.closed
        streamed = attacker.sent
    print(f"{when}: {streamed} bytes accepted, peak RSS growth {peak.growth / MiB:.1f} MiB")
    assert streamed < _socket_buffers() + MiB, streamed
    assert peak.growth < 20 * MiB, f"peak RSS grew by {peak.growth / MiB:.1f} MiB"
    assert echo_ok(node.port)


def _never_ending_store(port: int, results: list[dict[str, object]]) -> None:
    """A C-STORE whose data set never ends; records what the node answered and when."""
    with Attacker(port, timeout=30.0) as attacker:
        attacker.associate(CTImageStorage, ExplicitVRLittleEndian)
        attacker.send(store_command(1, CTImageStorage, "1.2.826.0.1.3680043.10.1543.77"))
        start = attacker.sent
        fragment = p_data(1, 0x00, bytes(MAX_PDU - 6))
        _flood(attacker, fragment)
        before_answer = attacker.sent - start
        answer = attacker.read(10.0)
        _flood(attacker, fragment)  # keep streaming after the refusal: the node must cut it off
        results.append({
            "status": answer.command.Status if answer and answer.command else None,
            "comment": str(answer.command.get("ErrorComment", "")) if answer and answer.command else "",
            "sent_before_answer": before_answer, "sent_in_all": attacker.sent - start,
            "closed": _closed(attacker),
        })


def _closed(attacker: Attacker) -> bool:
    """Whether the node closed the connection, after an A-ABORT or without one."""
    answer = attacker.read(10.0)
    if answer is not None and answer.pdu_type == 0x07:
        answer = attacker.read(10.0)
    return answer is None and attacker.closed


def _refused_at(comment: str) -> int:
    assert "refused at byte" in comment, comment
    return int(comment.rsplit(" ", 1)[1])


def test_never_ending_store_is_refused_within_the_limit_plus_one_pdu(node: NodeProcess) -> None:
    results: list[dict[str, object]] = []
    with PeakRss(_pid(node)) as peak:
        _never_ending_store(node.port, results)
    (result,) = results
    print(f"never-ending C-STORE: {result}, peak RSS growth {peak.growth / MiB:.1f} MiB")
    assert result["status"] == 0xA701
    # Counted by the node: it answers as soon as the data set passes the limit.
    assert MAX_INSTANCE < _refused_at(str(result["comment"])) <= MAX_INSTANCE + MAX_PDU
    # Counted by the attacker: the same, plus what the kernel buffered on the way.
    assert int(str(result["sent_before_answer"])) <= MAX_INSTANCE + MAX_PDU + _socket_buffers()
    # Streaming on after the refusal: cut off after another max_instance_size.
    assert result["closed"]
    assert int(str(result["sent_in_all"])) <= 2 * MAX_INSTANCE + 2 * MAX_PDU + _socket_buffers()
    assert peak.growth < MAX_INSTANCE + 20 * MiB, f"peak RSS grew by {peak.growth / MiB:.1f} MiB"
    assert not list((node.data_dir / "tmp").iterdir())  # the spool file is gone
    assert echo_ok(node.port)


def test_sixteen_never_ending_stores_stay_under_the_documented_peak(node: NodeProcess) -> None:
    results: list[dict[str, object]] = []
    threads = [threading.Thread(target=_never_ending_store, args=(node.port, results))
               for _ in range(16)]
    with PeakRss(_pid(node)) as peak:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert len(results) == 16
    assert all(r["status"] == 0xA701 and r["closed"] for r in results), results
    assert all(_refused_at(str(r["comment"])) <= MAX_INSTANCE + MAX_PDU for r in results)
    documented = 16 * PER_ASSOCIATION_PEAK
    print(f"16 associations: peak RSS growth {peak.growth / MiB:.1f} MiB, "
          f"documented bound {documented / MiB:.0f} MiB")
    assert peak.growth < documented, f"peak RSS grew by {peak.growth / MiB:.1f} MiB"
    assert not list((node.data_dir / "tmp").iterdir())
    assert echo_ok(node.port)


def test_pipelined_stores_wait_for_the_handler_instead_of_piling_up(node: NodeProcess) -> None:
    """60 complete C-STOREs of 0.9 MB (in memory: under the spool threshold) sent back to back
    without reading a response: the node stops reading while one waits for the handler. Without
    that back-pressure this grew the peak by about 42 MiB here; with it, about 5 MiB."""
    messages = []
    for number in range(1, 61):
        ds = ct_dataset(size=670, seed=number)
        data = body(ds)
        fragments = [data[i:i + MAX_PDU - 6] for i in range(0, len(data), MAX_PDU - 6)]
        messages.append(store_command(1, CTImageStorage, ds.SOPInstanceUID, number) + b"".join(
            p_data(1, LAST if i == len(fragments) - 1 else 0, chunk) for i, chunk in enumerate(fragments)))
    with PeakRss(_pid(node)) as peak, Attacker(node.port, timeout=60.0) as attacker:
        attacker.associate(CTImageStorage, ExplicitVRLittleEndian)
        for message in messages:
            assert attacker.send(message)
        statuses = []
        while len(statuses) < len(messages) and (answer := attacker.read(60.0)) is not None:
            if answer.command is not None:
                statuses.append(int(answer.command.Status))
    print(f"60 pipelined C-STOREs: peak RSS growth {peak.growth / MiB:.1f} MiB")
    assert statuses == [0] * len(messages)
    # One association's documented peak, plus room for the index and caches the stores warm up.
    assert peak.growth < PER_ASSOCIATION_PEAK + 10 * MiB, f"peak RSS grew by {peak.growth / MiB:.1f} MiB"


def test_node_pid_is_the_server(node: NodeProcess) -> None:
    """The RSS read above is the serving process's own, not a launcher's."""
    assert Path(f"/proc/{_pid(node)}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-m", b"dicom_node"]
    assert os.path.exists(f"/proc/{_pid(node)}/clear_refs")

"""A hostile DICOM peer on a raw socket: hand-made PDUs, so a test can lie about lengths.

Only what the ingest limit tests need: an A-ASSOCIATE-RQ for one presentation context, P-DATA-TF
PDUs with one PDV, a C-STORE-RQ command set, and reading the node's answers as they come.
"""

import select
import socket
import struct
import time
from dataclasses import dataclass
from io import BytesIO

from pydicom import Dataset
from pynetdicom.dsutils import decode, encode

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
COMMAND, LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(sop_class: str, transfer_syntax: str, called: str = "XAI_NODE",
                 calling: str = "ATTACKER", max_pdu: int = 131072) -> bytes:
    """An A-ASSOCIATE-RQ proposing one presentation context (ID 1)."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, sop_class.encode()) + _item(
        0x40, transfer_syntax.encode())
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.10.1543.9")
    body = (
        struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
        + b"\x00" * 32 + _item(0x10, APPLICATION_CONTEXT) + _item(0x20, context) + _item(0x50, user)
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def p_data(context_id: int, control: int, payload: bytes) -> bytes:
    """A P-DATA-TF PDU holding one PDV."""
    pdv = struct.pack(">LBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def store_command(context_id: int, sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (with a data set to follow) as one P-DATA-TF PDU."""
    ds = Dataset()
    ds.AffectedSOPClassUID = sop_class
    ds.CommandField = 0x0001
    ds.MessageID = message_id
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000
    ds.AffectedSOPInstanceUID = sop_instance
    body = encode(ds, True, True)
    assert body is not None
    group_length = b"\x00\x00\x00\x00\x04\x00\x00\x00" + struct.pack("<L", len(body))
    return p_data(context_id, COMMAND | LAST, group_length + body)


@dataclass
class Answer:
    """A PDU the node sent: its type and, for P-DATA, the decoded command set."""

    pdu_type: int
    command: Dataset | None = None


class Attacker:
    """One connection to the node; every method is bounded by ``timeout``."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.sent = 0
        self.closed = False

    def __enter__(self) -> "Attacker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """Send ``data``; ``False`` once the node has closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True
            return False
        self.sent += len(data)
        return True

    def associate(self, sop_class: str, transfer_syntax: str) -> None:
        self.send(associate_rq(sop_class, transfer_syntax))
        answer = self.read(self.timeout)
        assert answer is not None and answer.pdu_type == 0x02, f"not accepted: {answer}"

    def _recv_exact(self, n: int, deadline: float) -> bytes | None:
        data = b""
        while len(data) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(n - len(data))
            except TimeoutError:
                return None
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            data += chunk
        return data

    def read(self, timeout: float) -> Answer | None:
        """The next PDU from the node, or ``None`` on timeout or a closed connection."""
        deadline = time.monotonic() + timeout
        header = self._recv_exact(6, deadline)
        if header is None:
            return None
        pdu_type, _, length = struct.unpack(">BBL", header)
        body = self._recv_exact(length, deadline)
        if body is None:
            return None
        if pdu_type != 0x04:
            return Answer(pdu_type)
        _, _, control = struct.unpack_from(">LBB", body)
        return Answer(pdu_type, decode(BytesIO(body[6:]), True, True) if control & COMMAND else None)

    def readable(self) -> bool:
        """Whether the node has sent something (or closed) that is not read yet."""
        return bool(select.select([self.sock], [], [], 0)[0])


def store_bytes(port: int, sop_class: str, sop_instance: str, transfer_syntax: str,
                data: bytes, fragment: int = 16384) -> tuple[int, str]:
    """Send ``data`` as the data set of one C-STORE, as it is; the (status, error comment)."""
    with Attacker(port) as attacker:
        attacker.associate(sop_class, transfer_syntax)
        attacker.send(store_command(1, sop_class, sop_instance))
        chunks = [data[i:i + fragment] for i in range(0, len(data), fragment)] or [b""]
        for number, chunk in enumerate(chunks, 1):
            attacker.send(p_data(1, LAST if number == len(chunks) else 0, chunk))
        answer = attacker.read(attacker.timeout)
        attacker.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
        attacker.read(attacker.timeout)
    assert answer is not None and answer.command is not None, "no C-STORE response"
    return int(answer.command.Status), str(answer.command.get("ErrorComment", ""))

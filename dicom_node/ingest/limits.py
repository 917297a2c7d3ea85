"""Bounded memory per association: PDU lengths, C-STORE sizes, spooling and back-pressure.

pynetdicom 3.0 trusts the peer with its memory: its DUL reads whatever length a PDU header
announces (``recv(pdu_length)``, whatever the negotiated maximum), its DIMSE provider appends
every data set fragment to a ``BytesIO`` until the last one arrives, and completed messages queue
up without bound while the handler works on an earlier one. An :class:`AssociationGuard`,
installed on each association when its connection opens (before the DUL thread starts), takes
over the two places where received bytes enter:

- the DUL's PDU reader: a PDU whose header announces more than its bound is answered with an
  A-ABORT and the connection is closed, without reading its body;
- the DIMSE provider's P-DATA intake: data set bytes are counted as they arrive; past
  ``spool_threshold`` a C-STORE data set goes to a temporary file under ``data_dir/tmp``; past
  ``max_instance_size`` the C-STORE is answered 0xA701 at once, the rest of it is discarded
  unread into memory, and if the peer sends more than another ``max_instance_size`` of it the
  association is aborted. The data set of any other request (the node serves only C-ECHO and
  C-STORE) is bounded by ``OTHER_DATA_SET_LIMIT``, past which the association is aborted. A
  new message is not read while a completed one waits for the handler, so TCP flow control
  holds the peer back instead of the node's memory.

Both are instance attributes replaced on one association's own objects, not patches of
pynetdicom's classes: other associations and other AEs in the process are untouched.
"""

import contextlib
import logging
import queue
import tempfile
import time
from dataclasses import dataclass
from enum import IntEnum
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import P_DATA

from dicom_node.config import Settings
from dicom_node.ingest.admission import host_key
from dicom_node.ingest.status import StoreStatus, error_comment
from dicom_node.logs import PeerLogLimiter

logger = logging.getLogger(__name__)


class PduType(IntEnum):
    """PDU types (PS3.8 9.3.1)."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


#: Bound on an A-ASSOCIATE-RQ/AC, which has no negotiated maximum (the request is held in memory
#: until pynetdicom reads it): 128 presentation contexts with 20 transfer syntaxes each and a
#: 64 KiB user identity (about 135 KB) stay under it; pynetdicom's largest request is 46 KB and
#: real ones are a few KB. The admission server's reading of the request uses the same bound.
ASSOCIATE_PDU_LIMIT = 256 * 1024
#: A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT are 4 bytes long (PS3.8 9.3.4, 9.3.6-9.3.8).
FIXED_PDU_LIMIT = 64
#: A command set is a few hundred bytes; this leaves room for any conformant one.
COMMAND_SET_LIMIT = 2**16
#: The data set of any message but a C-STORE-RQ. The node serves C-ECHO (no data set) and
#: C-STORE only; an identifier of any other request is a few KB, and it is answered "refused"
#: anyway, so it must not be held in memory up to ``max_instance_size``.
OTHER_DATA_SET_LIMIT = 2**16
_POLL_SECONDS = 0.002
_READ_SIZE = 2**16
_SPOOL_PREFIX = "spool-"


@dataclass(frozen=True)
class ReceiveLimits:
    """What one association may make the node hold, from ``[ingest]``."""

    max_pdu_size: int
    max_instance_size: int
    spool_threshold: int
    spool_dir: Path
    handler_wait: float  # how long a new message waits for the handler before an abort
    pdu_timeout: float = 60.0  # a PDU must arrive whole within this of its first byte

    @classmethod
    def from_settings(cls, settings: Settings) -> "ReceiveLimits":
        return cls(
            max_pdu_size=settings.ingest.max_pdu_size,
            max_instance_size=settings.ingest.max_instance_size,
            spool_threshold=settings.ingest.spool_threshold,
            spool_dir=settings.node.data_dir / "tmp",
            handler_wait=settings.ingest.dimse_timeout,
            pdu_timeout=settings.ingest.network_timeout,
        )

    def pdu_limit(self, pdu_type: int) -> int:
        """The largest PDU length (the header's length field) accepted for ``pdu_type``."""
        if pdu_type == PduType.P_DATA_TF:
            return self.max_pdu_size  # Maximum Length Received bounds the same field (PS3.8 D.1)
        if pdu_type in (PduType.A_ASSOCIATE_RQ, PduType.A_ASSOCIATE_AC):
            return ASSOCIATE_PDU_LIMIT
        return FIXED_PDU_LIMIT


def install_guard(event: Event, limits: ReceiveLimits, peer_log: PeerLogLimiter | None = None) -> None:
    """``EVT_CONN_OPEN`` handler: put an :class:`AssociationGuard` on the new association."""
    AssociationGuard(event.assoc, limits, peer_log).install()


def spooled_path(request: C_STORE) -> Path | None:
    """The file holding a C-STORE data set that was spooled to disk, or ``None`` if in memory."""
    path = request._dataset_path  # set from the message's spool file by pynetdicom
    return path if isinstance(path, Path) else None


class AssociationGuard:
    """Bounds on what one association's peer can make the node buffer."""

    def __init__(self, assoc: Association, limits: ReceiveLimits,
                 peer_log: PeerLogLimiter | None = None) -> None:
        self.assoc = assoc
        self.limits = limits
        self.peer_log = peer_log  # a peer decides how often these lines would be written
        self.closing = False  # an abort is under way: read nothing more
        self.received = 0  # data set bytes of the message being received
        self.discarded: int | None = None  # bytes dropped after a refusal; None when not dropping
        self._message: DIMSEMessage | None = None  # the message ``received`` counts
        self._receive = assoc.dimse.receive_primitive

    def install(self) -> None:
        """Take over the association's PDU reader and P-DATA intake; clean up when it closes."""
        dul: Any = self.assoc.dul
        dimse: Any = self.assoc.dimse
        dul._read_pdu_data = self.read_pdu
        dimse.receive_primitive = self.receive
        self.assoc.bind(evt.EVT_CONN_CLOSE, self.release)

    def read_pdu(self) -> None:
        """Read one PDU, as pynetdicom's ``DULServiceProvider._read_pdu_data``, with bounds.

        The whole PDU must arrive within ``pdu_timeout`` of this call (made once its first byte
        is readable). Puts the state machine's event on the DUL's event queue: Evt17 for a
        closed connection or a PDU past its deadline, Evt19 (A-ABORT, then close) for an
        unknown or oversized PDU, else the PDU's own.
        """
        dul: Any = self.assoc.dul
        if self.closing:  # whatever follows an oversized header is its body: never read it
            dul.event_queue.put("Evt17")
            return
        # Called once a first byte is readable. Without a deadline, a peer that sends one byte
        # and stalls holds this thread, its socket and its association slot for good.
        deadline = time.monotonic() + self.limits.pdu_timeout
        header = self._recv(6, deadline)
        if len(header) < 6:
            dul.event_queue.put("Evt17")
            return
        pdu_type, length = header[0], int.from_bytes(header[2:6], "big")
        if pdu_type not in PduType.__members__.values():
            self.abort(f"unknown PDU type 0x{pdu_type:02X}")
            return
        if length > self.limits.pdu_limit(pdu_type):
            self.abort(f"{PduType(pdu_type).name} of {length} bytes exceeds "
                       f"{self.limits.pdu_limit(pdu_type)}")
            return
        self._read_body(dul, header, length, deadline)

    def _recv(self, nbytes: int, deadline: float) -> bytes:
        """Up to ``nbytes`` from the peer by ``deadline``; fewer only if it closed or ran late.

        The bytes the admission server read ahead (its A-ASSOCIATE-RQ, see
        ``transport._PrefixedSocket``) come first.
        """
        wrapper: Any = self.assoc.dul.socket
        data = bytearray()
        prefix = getattr(wrapper, "_prefix", None)
        if prefix:
            data += prefix[:nbytes]
            del prefix[:nbytes]
        sock = wrapper.socket
        if sock is None:  # closed under us (a stop): a short read
            return bytes(data)
        try:
            while len(data) < nbytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._timed_out(nbytes, len(data))
                    break
                sock.settimeout(remaining)
                chunk = sock.recv(min(nbytes - len(data), _READ_SIZE))
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            self._timed_out(nbytes, len(data))
        except OSError:
            pass  # reset or shut down: the caller sees a short read
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(None)  # pynetdicom's sends expect a blocking socket
        return bytes(data)

    def _timed_out(self, nbytes: int, got: int) -> None:
        self._warn("closing association with %s: PDU incomplete after %s s (%d of %d bytes)",
                   self._peer(), self.limits.pdu_timeout, got, nbytes)

    def _read_body(self, dul: Any, header: bytes, length: int, deadline: float) -> None:
        body = self._recv(length, deadline)
        if len(body) != length:
            dul.event_queue.put("Evt17")
            return
        try:
            pdu, event = dul._decode_pdu(bytearray(header) + body)
        except Exception:  # pynetdicom's decoders raise many types on malformed PDUs
            self._warn("undecodable PDU from %s: aborting", self._peer())
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    def abort(self, reason: str) -> None:
        """From the DUL thread: send an A-ABORT, close, and read nothing more."""
        self._warn("aborting association with %s: %s", self._peer(), reason)
        self.closing = True
        self._drop_message()
        # Evt19 "invalid PDU": the state machine sends the A-ABORT and tells the association;
        # calling Association.abort() here would wait on this very thread.
        self.assoc.dul.event_queue.put("Evt19")

    def receive(self, primitive: P_DATA) -> None:
        """P-DATA intake: each fragment is checked and counted before pynetdicom stores it."""
        for context_id, data in primitive.presentation_data_value_list:
            if self.closing:
                return
            if not data:
                self.abort("empty presentation data value")
                return
            if self.discarded is not None:
                self._discard(data)
                continue
            if self._admit(data):
                single = P_DATA()
                # typed as tuples, but its setter accepts only lists
                single.presentation_data_value_list = [cast(Any, [context_id, data])]
                self._receive(single)
            elif not self.closing:
                self._refuse(context_id)
                if data[0] & 2:  # the data set ended in the fragment that went over the limit
                    self.discarded = None

    def _admit(self, data: bytes) -> bool:
        """Account for one fragment; ``False`` when it takes its C-STORE past the size limit."""
        dimse: Any = self.assoc.dimse
        message = dimse.message
        if data[0] & 1:  # a command fragment
            if message is None:
                self._wait_for_handler()
                return not self.closing
            if message.encoded_command_set.tell() + len(data) > COMMAND_SET_LIMIT:
                self.abort(f"command set over {COMMAND_SET_LIMIT} bytes")
                return False
            return True
        if message is None or type(message) is DIMSEMessage:
            self.abort("data set fragment before a complete command set")
            return False
        if message is not self._message:
            self._message, self.received = message, 0
        self.received += len(data) - 1
        if not isinstance(message, C_STORE_RQ):
            if self.received > OTHER_DATA_SET_LIMIT:
                self.abort(f"{type(message).__name__} data set over {OTHER_DATA_SET_LIMIT} bytes")
                return False
            return True
        if self.received > self.limits.max_instance_size:
            if message.command_set.MessageID is not None:
                return False  # refused with 0xA701
            self.abort(f"data set over {self.limits.max_instance_size} bytes")
            return False
        if self.received > self.limits.spool_threshold and isinstance(message, C_STORE_RQ):
            self._spool(message)
        return True

    def _wait_for_handler(self) -> None:
        """Hold a new message back while a completed one waits for the handler.

        Not reading is TCP back-pressure on the peer; without it a fast peer queues complete
        data sets in memory faster than the handler writes them.
        """
        dimse: Any = self.assoc.dimse
        dul: Any = self.assoc.dul
        deadline = time.monotonic() + self.limits.handler_wait
        while dimse.msg_queue.qsize() and not dul._kill_thread:
            if time.monotonic() > deadline:
                self.abort(f"handler busy for over {self.limits.handler_wait} s")
                return
            time.sleep(_POLL_SECONDS)

    def _spool(self, message: C_STORE_RQ) -> None:
        """Move the data set received so far to a file; pynetdicom appends the rest to it."""
        if message._data_set_file is not None:
            return
        logger.debug("spooling the data set of %s to disk past %d bytes",
                     str(message.command_set.AffectedSOPInstanceUID or "")[:64], self.received)
        spool = tempfile.NamedTemporaryFile(  # noqa: SIM115 -- closed by pynetdicom or release()
            dir=self.limits.spool_dir, prefix=_SPOOL_PREFIX, suffix=".part", delete=False
        )
        buffer = cast(Any, message.data_set)
        spool.write(buffer.getbuffer())
        buffer.close()
        message.data_set = BytesIO()  # empty, not None: pynetdicom needs one to see a request
        # pynetdicom writes later fragments to ``_data_set_file``, hands ``_data_set_path`` to
        # the handler, and closes and deletes the file once the handler returns.
        message._data_set_file = cast(Any, spool)
        message._data_set_path = Path(spool.name)

    def _refuse(self, context_id: int) -> None:
        """Answer 0xA701 now, drop what was received, discard the rest of the data set."""
        dimse: Any = self.assoc.dimse
        command = dimse.message.command_set
        limit = self.limits.max_instance_size
        self._warn("refused %s from %s: data set over %d bytes",
                   str(command.AffectedSOPInstanceUID or "")[:64], self._peer(), limit)
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = command.MessageID
        rsp.AffectedSOPClassUID = command.AffectedSOPClassUID
        rsp.AffectedSOPInstanceUID = command.AffectedSOPInstanceUID
        rsp.Status = int(StoreStatus.OUT_OF_RESOURCES_INSTANCE_TOO_LARGE)
        rsp.ErrorComment = error_comment(  # type: ignore[assignment]  # typed None in pynetdicom
            f"instance exceeds limit {limit}: refused at byte {self.received}")
        self._drop_message()
        self.discarded = 0
        dimse.send_msg(rsp, context_id)

    def _discard(self, data: bytes) -> None:
        """Drop a fragment of a refused data set; abort if the peer goes on past the allowance."""
        if data[0] & 1:
            self.abort("command fragment inside a refused data set")
            return
        assert self.discarded is not None
        self.discarded += len(data) - 1
        if data[0] & 2:  # its last fragment: the association goes on with the next message
            self.discarded = None
        elif self.discarded > self.limits.max_instance_size:
            self.abort(f"peer sent {self.discarded} more bytes of a refused data set")

    def _drop_message(self) -> None:
        """Forget the message being received and delete its spool file."""
        dimse: Any = self.assoc.dimse
        message = dimse.message
        dimse.message = None
        self._message, self.received = None, 0
        if message is not None:
            _delete_spool(message)

    def release(self, event: Event) -> None:
        """``EVT_CONN_CLOSE``: delete the spool file of a message the connection cut short."""
        message = getattr(self.assoc.dimse, "message", None)
        if message is not None:
            _delete_spool(message)

    def _warn(self, msg: str, *args: object) -> None:
        if self.peer_log is None:
            logger.warning(msg, *args)
        else:
            self.peer_log.log(logging.WARNING, host_key(self.assoc.requestor.address), msg, *args)

    def _peer(self) -> str:
        requestor = self.assoc.requestor
        return f"{requestor.ae_title.strip() or '?'}@{requestor.address}"


def discard_queued(assoc: Association) -> int:
    """Empty a finished association's queue of received messages; delete their spool files.

    Call it once the association's thread has ended: nobody takes from the queue any more. A
    peer that aborts while complete C-STOREs wait for the handler would otherwise leave their
    spool files under ``data_dir/tmp`` for good. Returns how many messages were dropped.
    """
    dimse: Any = assoc.dimse
    dropped = 0
    while True:
        try:
            _, primitive = dimse.msg_queue.get_nowait()
        except queue.Empty:
            break
        if primitive is None:  # pynetdicom's own (None, None) entries carry nothing
            continue
        dropped += 1
        spool = getattr(primitive, "_dataset_file", None)
        primitive._dataset_file = primitive._dataset_path = None
        if spool is not None:
            spool.close()
            Path(spool.name).unlink(missing_ok=True)
    message = getattr(dimse, "message", None)
    if message is not None:  # cut short, and EVT_CONN_CLOSE may not have fired
        _delete_spool(message)
    return dropped


def _delete_spool(message: DIMSEMessage) -> None:
    spool = message._data_set_file
    if spool is not None:
        message._data_set_file = None
        message._data_set_path = None
        spool.close()
        Path(spool.name).unlink(missing_ok=True)

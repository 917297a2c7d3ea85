"""The exporter: sends due outbox records, one thread and one association at a time per
destination, and checks every response (PS3.4 B.2.3 statuses; PS3.8 A-ASSOCIATE-RJ results)."""

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from enum import Enum
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.audit import NO_AUDIT, Audit
from dicom_node.config import Destination, ExportSettings, TlsSettings
from dicom_node.export.outbox import DeliveryState, Outbox, OutboxRecord
from dicom_node.jobs.queue import QueuePolicy
from dicom_node.tls import ClientContext, tls_args

logger = logging.getLogger(__name__)

#: Warning statuses of C-STORE outside 0xBxxx: the destination kept the instance (PS3.4 B.2.3).
WARNINGS = frozenset({0x0001, 0x0107, 0x0116})


class Outcome(Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # retried with backoff for as long as it takes
    NO_RESPONSE = "no response"  # sent, never answered: retried max_unconfirmed times, then unconfirmed
    PERMANENT = "permanent"  # retried max_attempts times, then dead


def classify(status: int | None) -> Outcome:
    """What a C-STORE response status means for the record (None: no response at all)."""
    if status is None:  # timed out or aborted after the request went out: the PACS may hold it
        return Outcome.NO_RESPONSE
    if 0xA700 <= status <= 0xA7FF:  # out of resources
        return Outcome.TRANSIENT
    if status == 0x0000 or status in WARNINGS or 0xB000 <= status <= 0xBFFF:  # every 0xBxxx is a warning
        return Outcome.DELIVERED
    return Outcome.PERMANENT  # 0xA9xx, 0xCxxx, 0x01xx failures: the data or the request is wrong


def _association_failure(assoc: Association) -> tuple[Outcome, str]:
    accepted = assoc.acceptor.primitive is not None and assoc.acceptor.primitive.result == 0x00
    if accepted and not assoc.is_rejected:  # accepted, then aborted by pynetdicom: no context fits
        return Outcome.PERMANENT, "the destination accepted none of the results' SOP classes"
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        primitive = assoc.acceptor.primitive
        result, source, reason = primitive.result, primitive.result_source, primitive.diagnostic
        text = f"association rejected ({primitive.result_str}, source {source}, reason {reason}: " \
               f"{primitive.reason_str})"
        return (Outcome.PERMANENT if result == 0x01 else Outcome.TRANSIENT), text
    return Outcome.TRANSIENT, "no association (connection refused, aborted or timed out)"


def _printable(text: str, limit: int = 64) -> str:
    """A peer's Error Comment, cut to its VR's 64 characters, printable ASCII only (some PACS echo
    identifiers there; it goes into records and logs)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


def storage_contexts(syntaxes: Mapping[str, Collection[str]]) -> list[PresentationContext]:
    """The contexts the node proposes to send instances: one per SOP class (at most 128, PS3.8's
    limit), each with the given transfer syntaxes of its files first, then Explicit and Implicit
    VR Little Endian. With no SOP class, Verification (an association needs one context)."""
    contexts = []
    for sop_class in sorted(syntaxes)[:128]:
        context = PresentationContext()
        context.abstract_syntax = sop_class
        own = sorted(set(syntaxes[sop_class]) - {ExplicitVRLittleEndian, ImplicitVRLittleEndian})
        context.transfer_syntax = [*own, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        contexts.append(context)
    return contexts or [build_context(Verification)]


class Exporter:
    """Delivers outbox records to the configured destinations, each destination on its own.

    ``serve`` runs one :class:`DestinationWorker` per destination (see :meth:`workers`), so a slow
    or dead destination delays no other; :meth:`send_due` is one pass over all of them in turn.
    """

    def __init__(self, outbox: Outbox, destinations: Sequence[Destination], settings: ExportSettings,
                 ae_title: str, clock: Callable[[], float] = time.time, audit: Audit | None = None,
                 tls: TlsSettings | None = None, source: str = "<config>") -> None:
        self.outbox = outbox
        self.destinations = {d.name: d for d in destinations}
        self.tls = tls or TlsSettings()
        self.source = source
        self._tls_failures: dict[str, str] = {}  # per destination; each has one thread
        for destination in destinations:  # a wrong file fails the start, not every send
            self._tls_args(destination)
        self.settings = settings
        self.ae_title = ae_title
        self.clock = clock
        self.audit = audit or NO_AUDIT
        # the job queue's retry policy; only its backoff is used (the exporter's give-up rules differ)
        self._policy = QueuePolicy(settings.max_attempts, settings.backoff_seconds,
                                   settings.max_backoff_seconds)
        # Send result files as they are on disk (no decode and re-encode of a 12 MB overlay) when
        # the destination accepted their transfer syntax; this process only ever sends results.
        _config.STORE_SEND_CHUNKED_DATASET = True
        # each destination's association in hand, so that a stop need not wait out a slow PACS
        self._in_hand: dict[str, Association] = {}
        self._in_hand_lock = threading.Lock()

    def workers(self) -> list["DestinationWorker"]:
        """One worker per configured destination, for a thread each."""
        return [DestinationWorker(self, name, self.settings.poll_seconds) for name in self.destinations]

    def send_due(self, stop: threading.Event | None = None) -> int:
        """One pass: every destination's due records, one destination after the other; returns how
        many were delivered. With ``stop`` set, the pass ends after the record in hand."""
        self.bury_unconfigured()
        delivered = 0
        for name in self.destinations:
            if stop is not None and stop.is_set():
                break
            try:
                delivered += self.send_to(name, stop)
            except Exception:  # one destination's trouble must not hold up the others
                logger.exception("export to %s failed unexpectedly", name)
        return delivered

    def bury_unconfigured(self) -> int:
        """Pending records for a destination no longer configured are dead; returns how many."""
        buried = 0
        for record in self.outbox.list(DeliveryState.PENDING, 1_000_000):
            if record.destination not in self.destinations:
                reason = f"destination {record.destination!r} is not configured"
                if self.outbox.dead(record, reason):
                    self._audit("result_dead", record, reason=reason)
                    buried += 1
        return buried

    def send_to(self, name: str, stop: threading.Event | None = None) -> int:
        """Send ``name``'s due records; returns how many were delivered.

        An association lost mid-pass (a store that timed out) leaves the records after it untried:
        they go on a new association at once, so one slow record never starves the next ones.
        """
        delivered = 0
        while stop is None or not stop.is_set():
            records = self.outbox.due(destination=name)
            if not records:
                break
            sent, untried = self._send(self.destinations[name], records, stop)
            delivered += sent
            if not untried or len(untried) == len(records):
                break  # all done, or no progress (the rest wait for their backoff or the stop)
        return delivered

    def _backoff(self, attempts: int) -> float:
        return self.clock() + self._policy.backoff(min(attempts, 60) + 1)

    def _failed(self, record: OutboxRecord, outcome: Outcome, reason: str) -> None:
        if outcome is Outcome.NO_RESPONSE and record.timeouts + 1 >= self.settings.max_unconfirmed:
            if self.outbox.unconfirmed(record, reason):
                self._audit("result_unconfirmed", record, reason=reason)
            logger.error("outbox record %d: %s to %s is unconfirmed after %d sends without a response "
                         "(the destination may hold it; outbox retry sends it again): %s", record.id,
                         record.sop_instance_uid, record.destination, record.timeouts + 1, reason)
        elif outcome is Outcome.PERMANENT and record.attempts + 1 >= self.settings.max_attempts:
            if self.outbox.dead(record, reason):
                self._audit("result_dead", record, reason=reason)
            logger.error("outbox record %d: %s to %s is dead after %d attempts: %s", record.id,
                         record.sop_instance_uid, record.destination, record.attempts + 1, reason)
        else:
            timed_out = outcome is Outcome.NO_RESPONSE
            if self.outbox.retry_later(record, reason, self._backoff(record.attempts), timed_out):
                self._audit("result_deferred", record, reason=reason)
            logger.warning("outbox record %d: %s to %s not delivered (attempt %d), will retry: %s", record.id,
                           record.sop_instance_uid, record.destination, record.attempts + 1, reason)

    def _audit(self, event: str, record: OutboxRecord, **fields: str) -> None:
        self.audit.record(event, study_instance_uid=record.study_instance_uid,
                          sop_instance_uid=record.sop_instance_uid, sop_class_uid=record.sop_class_uid,
                          destination=record.destination, job=record.job_id, attempts=record.attempts + 1,
                          sends=record.sends, **fields)

    def _ae(self, destination: Destination, sop_classes: Collection[str]) -> AE:
        """The requesting AE for ``destination``, with its timeouts and a context per SOP class."""
        ae = AE(ae_title=self.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        timeout = destination.timeout_seconds or self.settings.timeout_seconds
        ae.acse_timeout = ae.connection_timeout = destination.connect_timeout_seconds or timeout
        ae.dimse_timeout = ae.network_timeout = timeout
        ae.requested_contexts = storage_contexts({sop_class: set() for sop_class in sop_classes})
        return ae

    def _tls_args(self, destination: Destination) -> tuple[ClientContext, str] | None:
        """The TLS context and server name for ``destination``, None for plain DICOM."""
        return tls_args(self.tls, destination, self.source)

    def _associate(self, destination: Destination, records: list[OutboxRecord]) -> Association:
        """An association with ``destination``; why its TLS handshake failed goes to
        :attr:`_tls_failures` (pynetdicom reports only "no association")."""
        ae = self._ae(destination, {r.sop_class_uid for r in records})
        secure = self._tls_args(destination)
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             max_pdu=131072, tls_args=secure)
        if secure is not None and secure[0].failure:
            self._tls_failures[destination.name] = f"TLS handshake failed: {secure[0].failure}"
        return assoc

    def abort(self, name: str | None = None) -> int:
        """Abort the association in hand for ``name`` (None: every destination); returns how many.

        Called when the node stops, after its stop event is set: a store cut short this way
        leaves its record pending (its send is counted) and it goes again on the next start.
        """
        with self._in_hand_lock:
            in_hand = [a for n, a in self._in_hand.items() if name is None or n == name]
        for assoc in in_hand:
            assoc.abort()
            # A local abort leaves a C-STORE waiting for its response until the DIMSE timeout
            # (pynetdicom wakes the waiter only when the peer aborts): wake it the same way.
            assoc.dimse.msg_queue.put((None, None))
        return len(in_hand)

    def _send(self, destination: Destination, records: list[OutboxRecord],
              stop: threading.Event | None) -> tuple[int, list[OutboxRecord]]:
        """One association: returns how many were delivered and the records left untried."""
        name = destination.name
        self._tls_failures.pop(name, "")
        assoc = self._associate(destination, records)
        if not assoc.is_established:
            outcome, reason = _association_failure(assoc)
            # retried like a refused connection: a certificate can be mended
            reason = self._tls_failures.pop(name, "") or reason
            for record in records:
                self._failed(record, outcome, f"{name}: {reason}")
            return 0, []
        with self._in_hand_lock:
            self._in_hand[name] = assoc
        try:
            return self._send_on(assoc, name, records, stop)
        finally:
            with self._in_hand_lock:
                self._in_hand.pop(name, None)
            if assoc.is_established and stop is not None and stop.is_set():
                assoc.abort()  # stopping: a slow PACS may take long to answer a release too
            elif assoc.is_established:
                assoc.release()

    def _send_on(self, assoc: Association, name: str, records: list[OutboxRecord],
                 stop: threading.Event | None) -> tuple[int, list[OutboxRecord]]:
        delivered = 0
        for i, record in enumerate(records):
            if stop is not None and stop.is_set():
                return delivered, records[i:]
            if not assoc.is_established and i > 0:
                return delivered, records[i:]  # lost after a store that timed out: a new one for these
            if not assoc.is_established:  # lost before any store: these wait for their backoff
                for rest in records:
                    self._failed(rest, Outcome.TRANSIENT, f"{name}: association lost")
                return 0, []
            try:
                delivered += self._store(assoc, name, record, stop)
            except Exception:  # the outbox itself failed (sending() or _failed()): the next pass
                logger.exception("result %s to %s: outbox error", record.sop_instance_uid, name)
        return delivered, []

    def _store(self, assoc: Association, name: str, record: OutboxRecord,
               stop: threading.Event | None = None) -> int:
        current = self.outbox.sending(record)  # counted before it goes out: a crash mid-send counts
        if current is None:
            return 0  # reset by a newer job or an operator since it was read: the next pass takes it
        try:
            return self._store_counted(assoc, name, current, stop)
        except Exception as exc:  # e.g. a pynetdicom error, or a locked database in delivered()
            # recorded against the record as sending() left it: the copy read before is stale,
            # and a failure recorded there would be lost (and the record sent again at once)
            logger.exception("result %s to %s: unexpected error", current.sop_instance_uid, name)
            self._failed(current, Outcome.PERMANENT, f"{name}: {type(exc).__name__}: {exc}"[:500])
            return 0

    def _store_counted(self, assoc: Association, name: str, record: OutboxRecord,
                       stop: threading.Event | None) -> int:
        """Send ``record`` (its send counted already) and record the outcome."""
        try:
            response = assoc.send_c_store(Path(record.path))
        except (OSError, InvalidDicomError) as exc:
            self._failed(record, Outcome.PERMANENT, f"result file unreadable: {exc}")
            return 0
        except ValueError:  # the file's transfer syntax was not accepted: let pynetdicom re-encode it
            try:
                response = assoc.send_c_store(dcmread(record.path))
            except ValueError as exc:  # no accepted presentation context for its SOP class at all
                self._failed(record, Outcome.PERMANENT, f"{name}: {exc}")
                return 0
        status = int(response.Status) if "Status" in response else None
        if status is None and stop is not None and stop.is_set():
            return 0  # cut short by the node's stop: pending as it is, sent again on the next start
        outcome = classify(status)
        if outcome is Outcome.DELIVERED:
            return self._delivered(record, name, status or 0)
        comment = f": {_printable(str(response.ErrorComment))}" if "ErrorComment" in response else ""
        reason = "no response (timeout or abort)" if status is None else f"status 0x{status:04X}{comment}"
        self._failed(record, outcome, f"{name}: {reason}")
        return 0

    def _delivered(self, record: OutboxRecord, name: str, status: int) -> int:
        note = "" if status == 0 else f"warning 0x{status:04X}"
        if not self.outbox.delivered(record, note):
            return 0  # reset by a newer job meanwhile: it goes again with the new content
        logger.log(logging.INFO if status == 0 else logging.WARNING,
                   "outbox record %d: %s delivered to %s, status 0x%04X (send %d)", record.id,
                   record.sop_instance_uid, name, status, record.sends)
        self._audit("result_delivered", record, status=f"0x{status:04X}")
        return 1


class DestinationWorker:
    """Sends one destination's records in a thread of its own; woken when results are queued for
    it, and every ``poll_seconds`` for retries."""

    def __init__(self, exporter: Exporter, name: str, poll_seconds: float) -> None:
        self.exporter = exporter
        self.name = name
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    def abort(self) -> None:
        """Cut short this destination's association in hand (the node is stopping)."""
        self.exporter.abort(self.name)

    def run_until(self, stop: threading.Event) -> None:
        """Send, then wait for a wake-up or the poll, until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.exporter.send_to(self.name, stop)
            except Exception:  # a database hiccup: try again on the next poll
                logger.exception("export to %s failed; trying again", self.name)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

"""The exporter: sends due outbox records, one association per destination, and checks every
response (PS3.4 B.2.3 statuses; PS3.8 A-ASSOCIATE-RJ results)."""

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.audit import NO_AUDIT, Audit
from dicom_node.config import Destination, ExportSettings
from dicom_node.export.outbox import Outbox, OutboxRecord

logger = logging.getLogger(__name__)

#: Warning statuses of C-STORE outside 0xBxxx: the destination kept the instance (PS3.4 B.2.3).
WARNINGS = frozenset({0x0001, 0x0107, 0x0116})


class Outcome(Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # retried with backoff for as long as it takes
    PERMANENT = "permanent"  # retried max_attempts times, then dead


def classify(status: int | None) -> Outcome:
    """What a C-STORE response status means for the record (None: no response at all)."""
    if status is None or 0xA700 <= status <= 0xA7FF:  # timeout/abort, or out of resources
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


class Exporter:
    """Delivers outbox records to the configured destinations."""

    def __init__(self, outbox: Outbox, destinations: Sequence[Destination], settings: ExportSettings,
                 ae_title: str, clock: Callable[[], float] = time.time, audit: Audit | None = None) -> None:
        self.outbox = outbox
        self.destinations = {d.name: d for d in destinations}
        self.settings = settings
        self.ae_title = ae_title
        self.clock = clock
        self.audit = audit or NO_AUDIT
        # Send result files as they are on disk (no decode and re-encode of a 12 MB overlay) when
        # the destination accepted their transfer syntax; this process only ever sends results.
        _config.STORE_SEND_CHUNKED_DATASET = True

    def send_due(self, stop: threading.Event | None = None) -> int:
        """One pass: every due record, grouped per destination; returns how many were delivered.
        With ``stop`` set, the pass ends after the record in hand (the rest stay pending)."""
        groups: dict[str, list[OutboxRecord]] = defaultdict(list)
        for record in self.outbox.due():
            groups[record.destination].append(record)
        delivered = 0
        for name, records in groups.items():
            if stop is not None and stop.is_set():
                break
            try:
                delivered += self._send(name, records, stop)
            except Exception:  # one destination's trouble must not hold up the others
                logger.exception("export to %s failed unexpectedly", name)
        return delivered

    def _backoff(self, attempts: int) -> float:
        s = self.settings
        return self.clock() + min(s.max_backoff_seconds, s.backoff_seconds * 2 ** min(attempts, 30))

    def _failed(self, record: OutboxRecord, outcome: Outcome, reason: str) -> None:
        if outcome is Outcome.PERMANENT and record.attempts + 1 >= self.settings.max_attempts:
            if self.outbox.dead(record, reason):
                self._audit("result_dead", record, reason=reason)
            logger.error("result %s to %s is dead after %d attempts: %s", record.sop_instance_uid,
                         record.destination, record.attempts + 1, reason)
        else:
            if self.outbox.retry_later(record, reason, self._backoff(record.attempts)):
                self._audit("result_deferred", record, reason=reason)
            logger.warning("result %s to %s not delivered (attempt %d), will retry: %s",
                           record.sop_instance_uid, record.destination, record.attempts + 1, reason)

    def _audit(self, event: str, record: OutboxRecord, **fields: str) -> None:
        self.audit.record(event, study_instance_uid=record.study_instance_uid,
                          sop_instance_uid=record.sop_instance_uid, sop_class_uid=record.sop_class_uid,
                          destination=record.destination, job=record.job_id, attempts=record.attempts + 1,
                          **fields)

    def _send(self, name: str, records: list[OutboxRecord], stop: threading.Event | None) -> int:
        destination = self.destinations.get(name)
        if destination is None:
            for record in records:
                if self.outbox.dead(record, f"destination {name!r} is not configured"):
                    self._audit("result_dead", record, reason=f"destination {name!r} is not configured")
            return 0
        ae = AE(ae_title=self.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        timeout = self.settings.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        for sop_class in sorted({r.sop_class_uid for r in records})[:128]:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             max_pdu=131072)
        if not assoc.is_established:
            outcome, reason = _association_failure(assoc)
            for record in records:
                self._failed(record, outcome, f"{name}: {reason}")
            return 0
        delivered = 0
        try:
            for record in records:
                if stop is not None and stop.is_set():
                    break  # the node is stopping: the rest stay pending
                if not assoc.is_established:
                    self._failed(record, Outcome.TRANSIENT, f"{name}: association lost")
                    continue
                try:
                    delivered += self._store(assoc, name, record)
                except Exception as exc:  # e.g. a damaged result file: this record, not the pass
                    logger.exception("result %s to %s: unexpected error", record.sop_instance_uid, name)
                    self._failed(record, Outcome.PERMANENT, f"{name}: {type(exc).__name__}: {exc}"[:500])
        finally:
            if assoc.is_established:
                assoc.release()
        return delivered

    def _store(self, assoc: Association, name: str, record: OutboxRecord) -> int:
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
        outcome = classify(status)
        if outcome is Outcome.DELIVERED:
            note = "" if status == 0 else f"warning 0x{status:04X}"
            if note:
                logger.warning("result %s to %s stored with %s", record.sop_instance_uid, name, note)
            if not self.outbox.delivered(record, note):
                return 0  # reset by a newer job meanwhile: it goes again with the new content
            self._audit("result_delivered", record, status=f"0x{status or 0:04X}")
            return 1
        comment = f": {_printable(str(response.ErrorComment))}" if "ErrorComment" in response else ""
        reason = "no response (timeout or abort)" if status is None else f"status 0x{status:04X}{comment}"
        self._failed(record, outcome, f"{name}: {reason}")
        return 0

"""The exporter: sends due outbox records, one association per destination, and checks every
response (PS3.4 B.2.3 statuses; PS3.8 A-ASSOCIATE-RJ results)."""

import logging
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

from dicom_node.audit import NO_AUDIT, Audit
from dicom_node.config import Destination, ExportSettings
from dicom_node.export.outbox import Outbox, OutboxRecord

logger = logging.getLogger(__name__)

#: Warning statuses of C-STORE: the destination kept the instance (PS3.4 B.2.3, GG.4).
WARNINGS = frozenset({0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})


class Outcome(Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # retried with backoff for as long as it takes
    PERMANENT = "permanent"  # retried max_attempts times, then dead


def classify(status: int | None) -> Outcome:
    """What a C-STORE response status means for the record (None: no response at all)."""
    if status is None or 0xA700 <= status <= 0xA7FF:  # timeout/abort, or out of resources
        return Outcome.TRANSIENT
    if status == 0x0000 or status in WARNINGS:
        return Outcome.DELIVERED
    return Outcome.PERMANENT  # 0xA9xx, 0xCxxx, 0x01xx failures: the data or the request is wrong


def _association_failure(assoc: Association) -> tuple[Outcome, str]:
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        primitive = assoc.acceptor.primitive
        result, source, reason = primitive.result, primitive.result_source, primitive.diagnostic
        text = f"association rejected ({primitive.result_str}, source {source}, reason {reason}: " \
               f"{primitive.reason_str})"
        return (Outcome.PERMANENT if result == 0x01 else Outcome.TRANSIENT), text
    return Outcome.TRANSIENT, "no association (connection refused, aborted or timed out)"


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

    def send_due(self) -> int:
        """One pass: every due record, grouped per destination; returns how many were delivered."""
        groups: dict[str, list[OutboxRecord]] = defaultdict(list)
        for record in self.outbox.due():
            groups[record.destination].append(record)
        return sum(self._send(name, records) for name, records in groups.items())

    def _backoff(self, attempts: int) -> float:
        s = self.settings
        return self.clock() + min(s.max_backoff_seconds, s.backoff_seconds * 2 ** attempts)

    def _failed(self, record: OutboxRecord, outcome: Outcome, reason: str) -> None:
        if outcome is Outcome.PERMANENT and record.attempts + 1 >= self.settings.max_attempts:
            self.outbox.dead(record.id, reason)
            self._audit("result_dead", record, reason=reason)
            logger.error("result %s to %s is dead after %d attempts: %s", record.sop_instance_uid,
                         record.destination, record.attempts + 1, reason)
        else:
            self.outbox.retry_later(record.id, reason, self._backoff(record.attempts))
            logger.warning("result %s to %s not delivered (attempt %d), will retry: %s",
                           record.sop_instance_uid, record.destination, record.attempts + 1, reason)

    def _audit(self, event: str, record: OutboxRecord, **fields: str) -> None:
        self.audit.record(event, study_instance_uid=record.study_instance_uid,
                          sop_instance_uid=record.sop_instance_uid, sop_class_uid=record.sop_class_uid,
                          destination=record.destination, job=record.job_id, attempts=record.attempts + 1,
                          **fields)

    def _send(self, name: str, records: list[OutboxRecord]) -> int:
        destination = self.destinations.get(name)
        if destination is None:
            for record in records:
                self.outbox.dead(record.id, f"destination {name!r} is not configured")
                self._audit("result_dead", record, reason=f"destination {name!r} is not configured")
            return 0
        ae = AE(ae_title=self.ae_title)
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
                if not assoc.is_established:
                    self._failed(record, Outcome.TRANSIENT, f"{name}: association lost")
                    continue
                delivered += self._store(assoc, name, record)
        finally:
            if assoc.is_established:
                assoc.release()
        return delivered

    def _store(self, assoc: Association, name: str, record: OutboxRecord) -> int:
        try:
            response = assoc.send_c_store(Path(record.path))
        except (OSError, InvalidDicomError) as exc:
            self.outbox.dead(record.id, f"result file unreadable: {exc}")
            self._audit("result_dead", record, reason=f"result file unreadable: {exc}")
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
            self.outbox.delivered(record.id, note)
            self._audit("result_delivered", record, status=f"0x{status or 0:04X}")
            return 1
        comment = f": {response.ErrorComment}" if "ErrorComment" in response else ""
        reason = "no response (timeout or abort)" if status is None else f"status 0x{status:04X}{comment}"
        self._failed(record, outcome, f"{name}: {reason}")
        return 0

"""The node's SCP: AE wiring, the C-ECHO and C-STORE handlers, and the server's life cycle.

The C-STORE handler only persists, indexes and answers: it writes the data set as received
(no decoding, no transcoding), reads its header, and returns success only once the instance is
durable on disk and indexed. Every other outcome is a named failure status with an Error Comment.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pydicom import Dataset
from pydicom._uid_dict import UID_dictionary
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, register_uid, uid_to_service_class  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.audit import NO_AUDIT, Audit
from dicom_node.config import Settings
from dicom_node.ingest.policy import AssociationPolicy
from dicom_node.ingest.status import EchoStatus, StoreStatus
from dicom_node.store import (
    InstanceStore,
    InvalidInstanceError,
    OutOfSpaceError,
    StagedInstance,
    StorageError,
)

logger = logging.getLogger(__name__)

#: Transfer syntaxes accepted for every storage SOP class; data sets are stored as received. When a
#: peer proposes several in one presentation context, the first of this list it proposes is taken:
#: uncompressed first (no work for the sender), then lossless, lossy only if nothing else is offered.
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
)

_ERROR_COMMENT_MAX = 64  # Error Comment is LO

#: Retired storage SOP classes (PS3.4 B.5, PS3.6 Table A-1 "Retired") that older modalities still
#: send, e.g. US Image Storage 1.2.840.10008.5.1.4.1.1.6: accepted and stored like current ones.
#: pynetdicom's storage list leaves them out; Storage Commitment is a service, not storage.
RETIRED_STORAGE = tuple(sorted(
    (UID(uid) for uid, (name, kind, _, retired, _) in UID_dictionary.items()
     if kind == "SOP Class" and retired == "Retired" and "Storage" in name
     and not uid.startswith("1.2.840.10008.1.")),
    key=lambda uid: [int(part) for part in uid.split(".")],
))


def failure(status: StoreStatus, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (truncated to fit LO)."""
    ds = Dataset()
    ds.Status = int(status)
    # LO: printable ASCII without backslash (a backslash would split it into several values)
    ds.ErrorComment = "".join(
        c if " " <= c <= "~" and c != "\\" else "?" for c in comment
    )[:_ERROR_COMMENT_MAX]
    return ds


def handle_echo(event: Event) -> int:
    """C-ECHO: the node is up."""
    return int(EchoStatus.SUCCESS)


def handle_store(
    event: Event, store: InstanceStore, max_instance_size: int, audit: Audit = NO_AUDIT
) -> int | Dataset:
    """C-STORE: store the data set durably and index it before answering success."""
    try:
        return _store(event, store, max_instance_size, audit)
    except Exception as exc:  # never let pynetdicom answer 0xC211 without a reason
        logger.exception("C-STORE failed unexpectedly")
        return failure(StoreStatus.PROCESSING_FAILURE, f"internal error: {type(exc).__name__}")


def _store(event: Event, store: InstanceStore, max_instance_size: int, audit: Audit) -> int | Dataset:
    request = cast(C_STORE, event.request)
    calling = event.assoc.requestor.ae_title.strip()
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    dataset = request.DataSet
    if dataset is None:
        return failure(StoreStatus.CANNOT_UNDERSTAND, "no data set in the request")
    with dataset.getbuffer() as encoded:
        size = encoded.nbytes
        if size > max_instance_size:
            logger.warning("refused %s from %s: %d bytes over limit", sop_uid[:64], calling, size)
            return failure(
                StoreStatus.OUT_OF_RESOURCES_INSTANCE_TOO_LARGE,
                f"instance of {size} bytes exceeds limit {max_instance_size}",
            )
        meta = event.file_meta
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        meta.SourceApplicationEntityTitle = calling
        try:
            staged = store.stage(meta, [encoded])
        except InvalidInstanceError as exc:
            return _refuse(exc, sop_uid, calling)
        except StorageError as exc:
            return _storage_failure(exc, sop_uid, calling)
    return _commit(store, staged, request, calling, audit)


def _storage_failure(exc: StorageError, sop_uid: str, calling: str) -> Dataset:
    """0xA700 for a full disk (or the free-space floor), 0x0110 for any other storage error."""
    logger.error("refused %s from %s: %s", sop_uid[:64], calling, exc)
    if isinstance(exc, OutOfSpaceError):
        return failure(StoreStatus.OUT_OF_RESOURCES, f"out of resources: {exc}")
    return failure(StoreStatus.PROCESSING_FAILURE, str(exc))


def _refuse(exc: InvalidInstanceError, sop_uid: str, calling: str) -> Dataset:
    logger.warning("refused %r from %s: %s", sop_uid[:64], calling, exc)
    status = (
        StoreStatus.CANNOT_UNDERSTAND_INVALID_UID if exc.kind == "uid"
        else StoreStatus.CANNOT_UNDERSTAND
    )
    return failure(status, str(exc))


def _mismatch(staged: StagedInstance, request: object) -> Dataset | None:
    header = staged.header
    if header.sop_class_uid != getattr(request, "AffectedSOPClassUID", None):
        return failure(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            "SOPClassUID differs from Affected SOP Class UID",
        )
    if header.sop_instance_uid != getattr(request, "AffectedSOPInstanceUID", None):
        return failure(
            StoreStatus.CANNOT_UNDERSTAND_UID_MISMATCH,
            "SOPInstanceUID differs from Affected SOP Instance UID",
        )
    return None


def _commit(store: InstanceStore, staged: StagedInstance, request: object, calling: str,
            audit: Audit) -> int | Dataset:
    committed = False
    try:
        refusal = _mismatch(staged, request)
        if refusal is not None:
            logger.warning("refused %s from %s: %s", staged.header.sop_instance_uid, calling,
                           refusal.ErrorComment)
            return refusal
        record = store.commit(staged, calling)
        committed = True
    except StorageError as exc:
        return _storage_failure(exc, staged.header.sop_instance_uid, calling)
    finally:
        if not committed:
            store.discard(staged)
    logger.debug(
        "stored %s (series %s) from %s", record.sop_instance_uid, record.series_instance_uid, calling
    )
    audit.record("instance_stored", study_instance_uid=record.study_instance_uid,
                 series_instance_uid=record.series_instance_uid, sop_instance_uid=record.sop_instance_uid,
                 sop_class_uid=record.sop_class_uid, calling_ae_title=calling, size_bytes=record.size_bytes)
    return int(StoreStatus.SUCCESS)


def handle_accepted(event: Event, audit: Audit) -> None:
    """A-ASSOCIATE-AC sent: recorded in the audit trail, with every presentation context refused."""
    requestor = event.assoc.requestor
    audit.record("association_accepted", calling_ae_title=requestor.ae_title.strip(),
                 address=requestor.address)
    for context in event.assoc.rejected_contexts:
        # a refused context is an instance the peer cannot send: never silent
        uid = str(context.abstract_syntax or "")
        logger.warning("refused presentation context %s (%s) from %s@%s: %s", uid,
                       UID(uid).name if uid else "no abstract syntax", requestor.ae_title.strip(),
                       requestor.address, context.status)
        audit.record("presentation_context_refused", calling_ae_title=requestor.ae_title.strip(),
                     address=requestor.address, sop_class_uid=uid, reason=context.status)


def handle_requested(event: Event, policy: AssociationPolicy, audit: Audit = NO_AUDIT) -> None:
    """A-ASSOCIATE-RQ: apply the association policy; reject with the proper reason."""
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    called = str(primitive.called_ae_title) if primitive else ""
    calling = str(primitive.calling_ae_title) if primitive else ""
    address = assoc.requestor.address
    others = sum(1 for a in assoc.ae.active_associations if a.is_acceptor and a is not assoc)
    rejection = policy.check(called, calling, address, others)
    if rejection is not None:
        logger.warning("rejected association from %s@%s: %s", calling.strip(), address,
                       rejection.description)
        assoc.acse.send_reject(rejection.result, rejection.source, rejection.reason)
        # As pynetdicom does for its own rejections: wait until the A-ASSOCIATE-RJ has gone out
        # and the peer closed, or the socket would be shut before the PDU is sent.
        assoc.kill()
        audit.record("association_rejected", calling_ae_title=calling.strip(), called_ae_title=called.strip(),
                     address=address, reason=rejection.reason.name.lower(), detail=rejection.description)


def build_ae(settings: Settings) -> AE:
    """An AE that accepts every storage SOP class, the retired ones too (:data:`RETIRED_STORAGE`),
    in :data:`TRANSFER_SYNTAXES`, plus Verification."""
    _config.LOG_HANDLER_LEVEL = "none"  # per-PDU log handlers cost 6-15 % even when silent
    ae = AE(ae_title=settings.node.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.require_called_aet = False  # the policy checks it, to log and reject in one place
    ae.maximum_associations = settings.ingest.max_associations + 1  # the policy rejects first
    ae.maximum_pdu_size = settings.ingest.max_pdu_size
    ae.acse_timeout = settings.ingest.acse_timeout
    ae.dimse_timeout = settings.ingest.dimse_timeout
    ae.network_timeout = settings.ingest.network_timeout
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
    for uid in RETIRED_STORAGE:
        # pynetdicom hands a C-STORE to the handler only for classes in its storage registry;
        # registering is its documented way, and idempotent
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, UID_dictionary[uid][4], StorageServiceClass)
        ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
    return ae


@dataclass
class IngestServer:
    """A running SCP bound to an address; stop it with :meth:`stop`."""

    ae: AE
    server: ThreadedAssociationServer

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self, grace_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Stop accepting, give open associations ``grace_seconds`` to finish, abort the rest.

        Returns once every association thread has ended, so no handler is left mid-write.
        """
        self.server.shutdown()
        deadline = clock() + grace_seconds
        while self.server.active_associations and clock() < deadline:
            time.sleep(0.05)
        remaining = self.server.active_associations
        if remaining:
            logger.warning("aborting %d association(s) still open at shutdown", len(remaining))
        for assoc in remaining:
            assoc.abort()
        for assoc in remaining:
            assoc.join(timeout=30)


def start_ingest(settings: Settings, store: InstanceStore, audit: Audit = NO_AUDIT) -> IngestServer:
    """Wire the handlers and start the SCP in background threads."""
    ae = build_ae(settings)
    policy = AssociationPolicy(
        ae_title=settings.node.ae_title,
        allowed_peers=settings.node.allowed_peers,
        max_associations=settings.ingest.max_associations,
    )
    handlers: list[Any] = [
        (evt.EVT_REQUESTED, handle_requested, [policy, audit]),
        (evt.EVT_ACCEPTED, handle_accepted, [audit]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [store, settings.ingest.max_instance_size, audit]),
    ]
    server = ae.start_server(
        (settings.node.bind, settings.node.port), block=False, evt_handlers=handlers
    )
    assert server is not None  # block=False always returns the server
    logger.info(
        "SCP %s listening on %s:%d", settings.node.ae_title, settings.node.bind,
        server.server_address[1],
    )
    return IngestServer(ae, server)

"""The node's SCP: AE wiring, the C-ECHO and C-STORE handlers, and the server's life cycle.

The C-STORE handler only persists, indexes and answers: it writes the data set as received
(no decoding, no transcoding), reads its header, and returns success only once the instance is
durable on disk and indexed. Every other outcome is a named failure status with an Error Comment.
"""

import contextlib
import functools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

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

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.audit import NO_AUDIT, Audit
from dicom_node.config import Settings
from dicom_node.ingest.accept import Note, Offer, accept
from dicom_node.ingest.admission import Admission, AdmissionLimits, host_key
from dicom_node.ingest.limits import ReceiveLimits, install_guard, spooled_path
from dicom_node.ingest.policy import AssociationPolicy
from dicom_node.ingest.status import EchoStatus, StoreStatus, error_comment
from dicom_node.ingest.transport import AdmissionServer
from dicom_node.logs import PeerLogLimiter
from dicom_node.query.scp import QUERY_RETRIEVE_SOP_CLASSES, handle_find, handle_get, handle_move
from dicom_node.store import InstanceStore
from dicom_node.tls import server_context, tls_args

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

#: Retired storage SOP classes (PS3.4 B.5, PS3.6 Table A-1 "Retired") that older modalities still
#: send, e.g. US Image Storage 1.2.840.10008.5.1.4.1.1.6: accepted and stored like current ones.
#: pynetdicom's storage list leaves them out; Storage Commitment is a service, not storage.
RETIRED_STORAGE = tuple(sorted(
    (UID(uid) for uid, (name, kind, _, retired, _) in UID_dictionary.items()
     if kind == "SOP Class" and retired == "Retired" and "Storage" in name
     and not uid.startswith("1.2.840.10008.1.")),
    key=lambda uid: [int(part) for part in uid.split(".")],
))
#: Every storage SOP class :func:`build_ae` negotiates, current and retired: what C-STORE takes,
#: and so what STOW-RS takes.
STORAGE_SOP_CLASSES = frozenset(
    {str(context.abstract_syntax) for context in AllStoragePresentationContexts} | set(RETIRED_STORAGE))


def failure(status: StoreStatus, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (truncated to fit LO)."""
    ds = Dataset()
    ds.Status = int(status)
    ds.ErrorComment = error_comment(comment)
    return ds


def handle_echo(event: Event) -> int:
    """C-ECHO: the node is up."""
    return int(EchoStatus.SUCCESS)


def peer_note(event: Event, peer_log: PeerLogLimiter | None) -> Note:
    """Where the lines about one peer's requests go: its per-host budget, if there is one.

    A peer decides how many requests it sends, so it must not decide how many lines are logged.
    """
    if peer_log is None:
        return logger.log
    key = host_key(event.assoc.requestor.address)
    return lambda level, msg, *args: peer_log.log(level, key, msg, *args)


def handle_store(
    event: Event, store: InstanceStore, max_instance_size: int, audit: Audit = NO_AUDIT,
    peer_log: PeerLogLimiter | None = None, policy: AssociationPolicy | None = None,
) -> int | Dataset:
    """C-STORE: store the data set durably and index it before answering success. With
    ``policy``, a peer without the store role (one admitted to query only) is refused."""
    requestor = event.assoc.requestor
    if policy is not None and not policy.may_store(requestor.ae_title, requestor.address):
        peer_note(event, peer_log)(logging.WARNING, "refused C-STORE from %s@%s: not in allowed_peers",
                                   requestor.ae_title.strip(), requestor.address)
        return failure(StoreStatus.NOT_AUTHORIZED, "not authorized to store (node.allowed_peers)")
    try:
        return _store(event, store, max_instance_size, audit, peer_note(event, peer_log))
    except Exception as exc:  # never let pynetdicom answer 0xC211 without a reason
        logger.exception("C-STORE failed unexpectedly")
        return failure(StoreStatus.PROCESSING_FAILURE, f"internal error: {type(exc).__name__}")


def _store(event: Event, store: InstanceStore, max_instance_size: int, audit: Audit,
           note: Note) -> int | Dataset:
    request = cast(C_STORE, event.request)
    spooled = spooled_path(request)  # a large data set arrives in a file under data_dir/tmp
    if spooled is not None:
        with spooled.open("rb") as fp:
            return _accept(event, store, fp, max_instance_size, audit, note)
    if request.DataSet is None:
        return failure(StoreStatus.CANNOT_UNDERSTAND, "no data set in the request")
    return _accept(event, store, request.DataSet, max_instance_size, audit, note)


def _accept(event: Event, store: InstanceStore, dataset: BinaryIO, max_instance_size: int,
            audit: Audit, note: Note) -> int | Dataset:
    """The C-STORE as an :class:`~dicom_node.ingest.accept.Offer`; the outcome as its response."""
    request = cast(C_STORE, event.request)
    offer = Offer(file_meta=event.file_meta, dataset=dataset,
                  calling=event.assoc.requestor.ae_title.strip(),
                  sop_class_uid=getattr(request, "AffectedSOPClassUID", None),
                  sop_instance_uid=getattr(request, "AffectedSOPInstanceUID", None))
    outcome = accept(offer, store, max_instance_size, audit, note)
    return int(StoreStatus.SUCCESS) if outcome.stored else failure(outcome.status, outcome.comment)


def disable_nagle(event: Event) -> None:
    """Send each response at once (TCP_NODELAY): with Nagle's algorithm a DIMSE response
    written in two pieces (command, then identifier) waits for the peer's delayed ACK, about
    40 ms, which made every C-FIND take 90 ms or more."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed by the peer: nothing to speed up
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def handle_accepted(event: Event, audit: Audit) -> None:
    """A-ASSOCIATE-AC sent: recorded in the audit trail, with every presentation context refused."""
    requestor = event.assoc.requestor
    wrapped = getattr(event.assoc.dul.socket, "socket", None)
    tls = wrapped.version() if isinstance(wrapped, ssl.SSLSocket) else None  # e.g. "TLSv1.3"
    audit.record("association_accepted", calling_ae_title=requestor.ae_title.strip(),
                 address=requestor.address, **({"tls": tls} if tls else {}))
    for context in event.assoc.rejected_contexts:
        # a refused context is an instance the peer cannot send: never silent
        uid = str(context.abstract_syntax or "")
        logger.warning("refused presentation context %s (%s) from %s@%s: %s", uid,
                       UID(uid).name if uid else "no abstract syntax", requestor.ae_title.strip(),
                       requestor.address, context.status)
        audit.record("presentation_context_refused", calling_ae_title=requestor.ae_title.strip(),
                     address=requestor.address, sop_class_uid=uid, reason=context.status)


def handle_requested(event: Event, policy: AssociationPolicy, audit: Audit = NO_AUDIT,
                     peer_log: PeerLogLimiter | None = None) -> None:
    """A-ASSOCIATE-RQ: apply the association policy; reject with the proper reason.

    Only accepted associations hold a slot: peers still in the handshake are bounded apart,
    by :class:`~dicom_node.ingest.admission.Admission`.
    """
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    called = str(primitive.called_ae_title) if primitive else ""
    calling = str(primitive.calling_ae_title) if primitive else ""
    address = assoc.requestor.address
    others = [a for a in assoc.ae.active_associations
              if a.is_acceptor and a.is_established and a is not assoc]
    host = host_key(address)
    same_host = sum(1 for a in others if host_key(a.requestor.address) == host)
    rejection = policy.check(called, calling, address, len(others), same_host)
    if rejection is not None:
        line = ("rejected association from %s@%s: %s", calling.strip(), address, rejection.description)
        if peer_log is None:
            logger.warning(*line)
        else:
            peer_log.log(logging.WARNING, host_key(address), *line)
        assoc.acse.send_reject(rejection.result, rejection.source, rejection.reason)
        # As pynetdicom does for its own rejections: wait until the A-ASSOCIATE-RJ has gone out
        # and the peer closed, or the socket would be shut before the PDU is sent.
        assoc.kill()
        audit.record("association_rejected", calling_ae_title=calling.strip(), called_ae_title=called.strip(),
                     address=address, reason=rejection.reason.name.lower(), detail=rejection.description)


def build_ae(settings: Settings) -> AE:
    """An AE that accepts every storage SOP class, the retired ones too (:data:`RETIRED_STORAGE`),
    in :data:`TRANSFER_SYNTAXES`, plus Verification and Query/Retrieve (Patient and Study Root
    FIND, GET, MOVE)."""
    _config.LOG_HANDLER_LEVEL = "none"  # per-PDU log handlers cost 6-15 % even when silent
    # Q/R identifiers hold patient names and IDs: pynetdicom must not log them
    _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
    ae = AE(ae_title=settings.node.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.require_called_aet = False  # the policy checks it, to log and reject in one place
    # pynetdicom counts every Association thread, accepted or still deciding; the policy counts
    # accepted ones and rejects first. This is only a backstop.
    ae.maximum_associations = settings.ingest.max_associations + settings.ingest.max_handshakes
    ae.maximum_pdu_size = settings.ingest.max_pdu_size
    ae.acse_timeout = settings.ingest.acse_timeout
    ae.dimse_timeout = settings.ingest.dimse_timeout
    ae.network_timeout = settings.ingest.network_timeout
    # C-MOVE connects to its destination with this AE: bound the TCP connect, or a dead host holds
    # the association's thread for the OS's ~2 min (one AE for all: the longest destination's)
    default = settings.export.timeout_seconds
    ae.connection_timeout = max((d.connect_timeout_seconds or d.timeout_seconds or default
                                 for d in settings.destinations), default=default)
    ae.add_supported_context(Verification)
    for uid in QUERY_RETRIEVE_SOP_CLASSES:
        ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        # both roles accepted: a C-GET peer proposes the storage SCP role for what it retrieves
        ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES),
                                 scu_role=True, scp_role=True)
    for uid in RETIRED_STORAGE:
        # pynetdicom hands a C-STORE to the handler only for classes in its storage registry;
        # registering is its documented way, and idempotent
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, UID_dictionary[uid][4], StorageServiceClass)
        ae.add_supported_context(uid, list(TRANSFER_SYNTAXES), scu_role=True, scp_role=True)
    return ae


#: Seconds the threads of aborted associations get to end once their sockets are shut down.
_ABORT_JOIN_SECONDS = 1.0


@dataclass
class IngestServer:
    """A running SCP, listening on one or two ports (plain, TLS); stop it with :meth:`stop`."""

    ae: AE
    servers: tuple[AdmissionServer, ...]

    @property
    def server(self) -> AdmissionServer:
        """The first listener: the plain one when the node listens on both."""
        return self.servers[0]

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS listener's port, if the node has one."""
        return next((int(s.server_address[1]) for s in self.servers if s.tls_context is not None), None)

    def _associations(self) -> list[Any]:
        return [a for server in self.servers for a in server.active_associations]

    def stop(self, grace_seconds: float, clock: Callable[[], float] = time.monotonic) -> bool:
        """Stop accepting, give open associations ``grace_seconds`` to finish, abort the rest.

        Connections still in the handshake are dropped at once. Aborting shuts the sockets down,
        which wakes any thread blocked on a peer, so this returns within about
        ``grace_seconds + 1.2`` s whatever the peers do. Returns False if an association thread
        is still running then (a handler stuck outside the network, say in a slow fsync): the
        stop is then not clean, and the next start checks the files against the index.
        """
        for server in self.servers:
            server.shutdown()
            server.drop_handshakes()
        deadline = clock() + grace_seconds
        while self._associations() and clock() < deadline:
            time.sleep(0.05)
        remaining = self._associations()
        if remaining:
            logger.warning("aborting %d association(s) still open at shutdown", len(remaining))
            for assoc in remaining:
                assoc.abort(block=False)  # an A-ABORT, if the peer still reads
            _join(remaining, clock() + 0.1, clock)
        for server in self.servers:
            server.close_connections()
        _join(remaining, clock() + _ABORT_JOIN_SECONDS, clock)
        stuck = [a for a in remaining if a.is_alive()]
        if stuck:
            logger.error("%d association thread(s) still running after abort", len(stuck))
        return not stuck


def _join(threads: list[Any], deadline: float, clock: Callable[[], float]) -> None:
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - clock()))


def start_ingest(settings: Settings, store: InstanceStore, audit: Audit = NO_AUDIT) -> IngestServer:
    """Wire the handlers and start the SCP in background threads."""
    ae = build_ae(settings)
    ingest = settings.ingest
    policy = AssociationPolicy(
        ae_title=settings.node.ae_title,
        allowed_peers=settings.node.allowed_peers,
        query_peers=settings.node.query_peers,
        max_associations=ingest.max_associations,
        max_associations_per_host=ingest.max_associations_per_host,
    )
    peer_log = PeerLogLimiter(logger, ingest.log_lines_per_host_per_minute)
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, install_guard, [ReceiveLimits.from_settings(settings), peer_log]),
        (evt.EVT_CONN_OPEN, disable_nagle),
        (evt.EVT_REQUESTED, handle_requested, [policy, audit, peer_log]),
        (evt.EVT_ACCEPTED, handle_accepted, [audit]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [store, ingest.max_instance_size, audit, peer_log, policy]),
        (evt.EVT_C_FIND, handle_find, [store, policy.may_query, settings.node.ae_title, audit]),
        (evt.EVT_C_GET, handle_get, [store, policy.may_query, audit]),
        (evt.EVT_C_MOVE, handle_move, [store, policy.may_query, settings.destinations, audit,
                                          functools.partial(tls_args, settings.tls, source=settings.source)]),
    ]
    admission = Admission(AdmissionLimits(
        max_handshakes=ingest.max_handshakes,
        max_connections_per_host=ingest.max_connections_per_host,
        connects_per_minute=ingest.connects_per_host_per_minute,
        evict_after=ingest.handshake_evict_after,
    ))
    # Both listeners share the admission bounds and the association policy: a peer's handshakes
    # and associations count the same on either port.
    listeners: list[tuple[int, ssl.SSLContext | None]] = (
        [(settings.node.port, None)] if "plain" in settings.node.listen else [])
    if "tls" in settings.node.listen:
        listeners.append((settings.tls.port, server_context(settings)))
    servers: list[AdmissionServer] = []
    try:  # bind every port before serving any, so a port in use leaves nothing running
        for port, context in listeners:
            servers.append(ae.make_server(  # type: ignore[arg-type]
                (settings.node.bind, port), evt_handlers=handlers, ssl_context=context,
                server_class=AdmissionServer, admission=admission,
                handshake_timeout=ingest.handshake_timeout, peer_log=peer_log,
            ))
    except BaseException:
        for server in servers:
            server.server_close()
        raise
    for server in servers:
        _serve(ae, settings, server)
    return IngestServer(ae, tuple(servers))


def _serve(ae: AE, settings: Settings, server: AdmissionServer) -> None:
    """Run ``server``'s accept loop in a thread of its own."""
    ae._servers.append(server)  # as AE.start_server does, so AE.shutdown() reaches it too
    tls = server.tls_context is not None
    # A short poll interval: stop() waits one interval for the accept loop to notice.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     name=f"ingest-accept{'-tls' if tls else ''}", daemon=True).start()
    logger.info(
        "SCP %s listening on %s:%d (%s)", settings.node.ae_title, settings.node.bind,
        server.server_address[1], "DICOM TLS" if tls else "plain DICOM",
    )

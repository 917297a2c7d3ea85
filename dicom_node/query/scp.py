"""The Query/Retrieve SCP: C-FIND, C-GET and C-MOVE handlers over the store's index, for the
node's own SCP (Patient Root and Study Root, PATIENT to IMAGE level).

Matching is :mod:`dicom_node.query.match`'s. Every handler first asks ``may_query`` whether
the calling AE holds the query role (``node.query_peers``), answers Cancel as soon as pynetdicom
reports a C-CANCEL, and logs and audits levels, counts and UIDs only: never the identifier's
values (they hold patient names and IDs).
"""

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_node.audit import NO_AUDIT, Audit
from dicom_node.config import Destination
from dicom_node.ingest.status import error_comment
from dicom_node.logs import patient_values, redacted_traceback
from dicom_node.query.match import Find, QueryError, Stored, find, level_of, retrieve
from dicom_node.query.status import QueryStatus
from dicom_node.store import InstanceStore
from dicom_node.store.keys import Level

logger = logging.getLogger(__name__)

#: The Q/R SOP classes the SCP supports.
QUERY_RETRIEVE_SOP_CLASSES = (
    PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove,
)
#: The Study Root SOP classes: no PATIENT level (PS3.4 C.6.2).
STUDY_ROOT = frozenset({StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
                        StudyRootQueryRetrieveInformationModelMove})
#: ``may_query(calling_ae_title, address)``: whether the peer holds the query/retrieve role.
MayQuery = Callable[[str, str], bool]
#: What a handler yields after its first answer: (status, identifier or data set to send).
Answer = tuple[int | Dataset, Any]
#: The most sub-operations one C-GET or C-MOVE answers for (their counts are US, PS3.4 C.4.2.3).
MAX_SUB_OPERATIONS = 65535


def status(code: QueryStatus, comment: str) -> Dataset:
    """A response status with an Error Comment."""
    ds = Dataset()
    ds.Status = int(code)
    ds.ErrorComment = error_comment(comment)
    return ds


def _peer(event: Event) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return requestor.ae_title.strip(), requestor.address


def _refusal(event: Event, may_query: MayQuery, service: str, audit: Audit) -> Dataset | None:
    calling, address = _peer(event)
    if may_query(calling, address):
        return None
    logger.warning("refused %s from %s@%s: not in node.query_peers", service, calling, address)
    audit.record("query_refused", calling_ae_title=calling, address=address, service=service,
                 reason="not_authorized")
    return status(QueryStatus.NOT_AUTHORIZED, f"{calling} may not query or retrieve (node.query_peers)")


def _study_root(event: Event) -> bool:
    return str(event.request.AffectedSOPClassUID or "") in STUDY_ROOT


def _checked(event: Event) -> None:
    """Raise :class:`QueryError` for a level the request's information model lacks."""
    if level_of(event.identifier) is Level.PATIENT and _study_root(event):
        raise QueryError("PATIENT level is not part of the Study Root information model")


def _failed(event: Event, service: str, exc: Exception, audit: Audit) -> Dataset:
    """The answer to a request that could not be processed; logged without identifier values."""
    if isinstance(exc, QueryError):
        calling, address = _peer(event)
        logger.warning("%s from %s: %s", service, calling, exc)
        audit.record("query_refused", calling_ae_title=calling, address=address, service=service,
                     reason="identifier")
        return status(QueryStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))
    logger.error("%s failed: %s", service, type(exc).__name__)
    try:
        secrets = patient_values([event.identifier])
    except Exception:  # the identifier did not decode: no value of it can be in the traceback
        secrets = set()
    logger.debug("%s failed:\n%s", service, redacted_traceback(exc, secrets))
    return status(QueryStatus.UNABLE_TO_PROCESS, f"unable to process: {type(exc).__name__}")


def handle_find(event: Event, store: InstanceStore, may_query: MayQuery, ae_title: str,
                audit: Audit = NO_AUDIT) -> Iterator[Answer]:
    """C-FIND: one pending response per match, then success; Cancel stops the matches."""
    refusal = _refusal(event, may_query, "C-FIND", audit)
    if refusal is not None:
        yield refusal, None
        return
    try:
        _checked(event)
        query = find(event.identifier, patient_root=not _study_root(event))
        rows = store.index.find(query.sql, query.params)
    except Exception as exc:  # a bad identifier, one that did not decode, or the index failed
        yield _failed(event, "C-FIND", exc, audit), None
        return
    calling, _ = _peer(event)
    logger.info("C-FIND at %s level from %s: %d match(es)", query.level.value, calling, len(rows))
    logger.debug("C-FIND keys: %s", ", ".join(query.return_keys))  # keywords only, never values
    audit.record("query", calling_ae_title=calling, level=query.level.value, matches=len(rows))
    asked_for_ae = "RetrieveAETitle" in event.identifier
    for row in rows:
        if event.is_cancelled:
            yield int(QueryStatus.CANCEL), None
            return
        answer = query.dataset(row)
        if asked_for_ae:
            answer.RetrieveAETitle = ae_title
        yield int(QueryStatus.PENDING), answer


def _matches(event: Event, store: InstanceStore, service: str,
             audit: Audit) -> tuple[Find, list[Stored]] | Dataset:
    """The instances a C-GET or C-MOVE sends, or the failure status to answer with."""
    try:
        _checked(event)
        query = retrieve(event.identifier)
        rows = [Stored(*(str(value) for value in row)) for row in store.index.find(query.sql, query.params)]
    except Exception as exc:
        return _failed(event, service, exc, audit)
    if len(rows) > MAX_SUB_OPERATIONS:
        return status(QueryStatus.OUT_OF_RESOURCES,
                      f"{len(rows)} instances match; at most {MAX_SUB_OPERATIONS} per request")
    return query, rows


def _audit_retrieve(audit: Audit, calling: str, query: Find, rows: Sequence[Stored],
                    destination: str) -> None:
    """A retrieve's audit event: what went where, by Study Instance UID (UIDs only)."""
    audit.record("retrieve", calling_ae_title=calling, level=query.level.value, instances=len(rows),
                 destination=destination,
                 study_instance_uids=sorted({stored.study_instance_uid for stored in rows}))


def _sub_operations(event: Event, data_dir: Path, rows: Sequence[Stored]) -> Iterator[Answer]:
    """(Pending, data set) per instance; an unreadable file is a failed sub-operation (pynetdicom
    counts any pending answer that is not a Dataset as one); Cancel ends the sub-operations."""
    for stored in rows:
        if event.is_cancelled:
            yield int(QueryStatus.CANCEL), None
            return
        try:
            ds = dcmread(data_dir / stored.path)
        except Exception as exc:  # a file removed or damaged since it was indexed
            logger.warning("cannot send %s: its file cannot be read (%s)", stored.sop_instance_uid,
                           type(exc).__name__)
            yield int(QueryStatus.PENDING), stored  # not a Dataset: a failed sub-operation
            continue
        yield int(QueryStatus.PENDING), ds


def handle_get(event: Event, store: InstanceStore, may_query: MayQuery,
               audit: Audit = NO_AUDIT) -> Iterator[int | Answer]:
    """C-GET: the matching instances as C-STORE sub-operations on the same association (the peer
    proposed the storage SCP role for their SOP classes)."""
    refusal = _refusal(event, may_query, "C-GET", audit)
    found = refusal if refusal is not None else _matches(event, store, "C-GET", audit)
    if isinstance(found, Dataset):
        yield 1  # pynetdicom answers success to 0 sub-operations: one, then the failure
        yield found, None
        return
    query, rows = found
    calling, _ = _peer(event)
    logger.info("C-GET at %s level from %s: %d instance(s)", query.level.value, calling, len(rows))
    _audit_retrieve(audit, calling, query, rows, calling)
    yield len(rows)
    yield from _sub_operations(event, store.data_dir, rows)


def move_destination(destinations: Sequence[Destination], ae_title: str) -> Destination | None:
    """The configured destination a C-MOVE names by its AE title, or None: unknown, or named by
    several entries (a plain and a TLS route to one PACS during a migration), where any choice
    could send in clear or to the wrong host."""
    matches = [d for d in destinations if d.ae_title == ae_title.strip()]
    if len(matches) > 1:
        logger.warning("C-MOVE destination %r is the ae_title of %d [[destinations]] (%s): refused; give "
                       "the entry to move to its own ae_title", ae_title.strip()[:16], len(matches),
                       ", ".join(d.name for d in matches))
        return None
    return matches[0] if matches else None


def move_contexts(rows: Sequence[Stored]) -> list[PresentationContext]:
    """The contexts the node proposes to a move destination: one per (SOP class, stored transfer
    syntax), since a destination accepts one transfer syntax per context (with several on one,
    every file of the others would fail), then Explicit and Implicit VR Little Endian per SOP
    class (the uncompressed files, and a fallback); inputs are sent as received, never
    transcoded. At most 128 (PS3.8): those the most instances need first."""
    uncompressed = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    need: Counter[tuple[str, tuple[str, ...]]] = Counter()
    for stored in rows:
        syntax = stored.transfer_syntax_uid
        need[stored.sop_class_uid, uncompressed if syntax in uncompressed else (syntax,)] += 1
    for sop_class in {stored.sop_class_uid for stored in rows}:
        need[sop_class, uncompressed] += 0  # the fallback, after every context a file needs
    chosen = sorted(need, key=lambda pair: (-need[pair], pair))[:128]
    if len(need) > len(chosen):
        logger.warning("C-MOVE needs %d presentation contexts; proposing the 128 most instances need",
                       len(need))
    return [build_context(sop_class, list(syntaxes)) for sop_class, syntaxes in sorted(chosen)] or [
        build_context(Verification)]


class MoveRefused(PermissionError):
    """A C-MOVE from a peer without the query role. pynetdicom cannot answer a C-MOVE failure
    before it has associated with a destination; raised at the first answer, it makes pynetdicom
    answer 0xC514 (a failure) and connect nowhere."""


def handle_move(event: Event, store: InstanceStore, may_query: MayQuery,
                destinations: Sequence[Destination], audit: Audit = NO_AUDIT,
                tls_for: Callable[[Destination], Any] = lambda destination: None) -> Iterator[Any]:
    """C-MOVE: the matching instances to a ``[[destinations]]`` entry named by its AE title, on
    a new association (over DICOM TLS for a destination with ``tls = true``: ``tls_for`` gives
    pynetdicom's ``tls_args``, as the exporter's); any other Move Destination is answered 0xA801.

    Raises
    ------
    MoveRefused
        The peer may not query or retrieve (at the first answer; see the class).
    """
    calling, address = _peer(event)
    if _refusal(event, may_query, "C-MOVE", audit) is not None:
        raise MoveRefused(f"{calling}@{address} is not in node.query_peers")
    requested = str(event.move_destination or "").strip()
    destination = move_destination(destinations, requested)
    if destination is None:
        shared = sum(d.ae_title == requested for d in destinations) > 1  # move_destination said why
        if not shared:
            logger.warning("C-MOVE from %s to unknown destination %r", calling, requested[:16])
        audit.record("query_refused", calling_ae_title=calling, address=address, service="C-MOVE",
                     reason="move_destination_ambiguous" if shared else "move_destination_unknown",
                     move_destination=requested[:16])
        yield None, None  # pynetdicom answers 0xA801 (Move Destination unknown)
        return
    found = _matches(event, store, "C-MOVE", audit)
    rows = [] if isinstance(found, Dataset) else found[1]
    options = {"contexts": move_contexts(rows), "max_pdu": 131072}
    tls_args = tls_for(destination)
    try:
        yield destination.host, destination.port, options | ({"tls_args": tls_args} if tls_args else {})
        yield from _move_answers(event, store, found, calling, destination, audit)
    except GeneratorExit:  # pynetdicom dropped this generator: after a failed association, at the count
        failure = getattr(tls_args[0], "failure", None) if tls_args else None
        if failure:
            logger.warning("C-MOVE to %s: TLS handshake failed: %s", destination.name, failure)
        raise


def _move_answers(event: Event, store: InstanceStore, found: tuple[Find, list[Stored]] | Dataset,
                  calling: str, destination: Destination, audit: Audit) -> Iterator[Any]:
    """A C-MOVE's answers after its destination: the sub-operation count (pynetdicom associates
    with the destination after it), then one answer per instance, or the failure."""
    if isinstance(found, Dataset):
        yield 1  # pynetdicom answers success to 0 sub-operations: one, then the failure
        yield found, None
        return
    query, rows = found
    logger.info("C-MOVE at %s level from %s to %s: %d instance(s)", query.level.value, calling,
                destination.name, len(rows))
    _audit_retrieve(audit, calling, query, rows, destination.name)
    yield len(rows)
    yield from _sub_operations(event, store.data_dir, rows)

"""STOW-RS (PS3.18 10.5): a second way in, to the same store, completeness timer, routing and
audit as C-STORE; the response reports each instance's failure with its reason.

``POST /studies`` and ``POST /studies/{study}`` take ``multipart/related;
type="application/dicom"``, one DICOM Part 10 file per part. Each part is streamed to a temporary
file under the store's ``tmp/`` in bounded chunks (never the whole body, never a whole part in
memory), then accepted off the event loop by :func:`dicom_node.ingest.accept.accept`, the very
path a C-STORE takes. While one part is being accepted the next is already being received.

Instances are recorded with :attr:`~dicom_node.dicomweb.DicomWebContext.stow_ae_title` as their
calling AE title and Source AE Title: an HTTP peer has no AE title, and a fixed label keeps
routing (``match.calling_ae_title``) and the metrics' labels meaningful. ``node.allowed_peers``
governs DICOM associations only; who may STOW is the web server's rule (its bearer token).
"""

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import BodyPartReader, MultipartReader, StreamReader, hdrs, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID

from dicom_node.dicomweb import CONTEXT, Accept, DicomWebContext
from dicom_node.dicomweb.http import base_url
from dicom_node.ingest.accept import Offer, Outcome, accept
from dicom_node.ingest.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from dicom_node.ingest.status import StoreStatus, error_comment
from dicom_node.logs import bare_traceback
from dicom_node.store import InvalidInstanceError, check_uid
from dicom_node.web.work import offload

logger = logging.getLogger(__name__)

#: The media type of a STOW-RS request's parts, and of its response.
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
#: Bytes read from a part at a time, and written to its temporary file at a time.
_READ_CHUNK = 2**18
_WRITE_CHUNK = 2**20
#: A client that sends nothing of its body for this long is cut (408, the connection closed, the
#: part being received removed): a stalled upload must not keep its connection and temporary
#: file for ever.
IDLE_SECONDS = 60.0
#: A part holds the preamble and File Meta Information besides the data set: room for them
#: beyond ``max_instance_size`` (which bounds the data set, as for C-STORE).
_META_ROOM = 2**16


#: The most parts one request may hold: each costs an outcome in memory and an item in the
#: response (20,000 one-byte parts cost 38 MB and a 3.7 MB answer). Beyond it the rest of the
#: body is not read: 413, with what was stored so far.
MAX_PARTS = 10_000


#: The longest multipart boundary read. RFC 2046 allows 70 characters and aiohttp enforces it,
#: but Orthanc's DICOMweb plugin (1.7) sends 73 (two UUIDs): tolerant when reading.
MAX_BOUNDARY = 200


class _TolerantReader(MultipartReader):
    """aiohttp's multipart reader, taking boundaries up to :data:`MAX_BOUNDARY` characters."""

    def _get_boundary(self) -> str:
        boundary = str(self._mimetype.parameters["boundary"])
        if len(boundary) > MAX_BOUNDARY:
            raise ValueError(f"boundary of {len(boundary)} characters ({MAX_BOUNDARY} at most)")
        return boundary


@dataclass
class _Request:
    """One STOW-RS request being received: its context and what became of each part."""

    ctx: DicomWebContext
    study: str | None
    body: StreamReader
    http: web.Request
    outcomes: list[Outcome] = field(default_factory=list)
    too_large: bool = False
    too_many: bool = False


def add_routes(app: web.Application) -> None:
    """Add this service's routes to the DICOMweb sub-application."""
    app.router.add_post("/studies", store_instances)
    app.router.add_post("/studies/{study}", store_instances)


async def store_instances(request: web.Request) -> web.StreamResponse:
    """PS3.18 10.5 Store Instances: every part accepted or refused on its own; 200 when all are
    stored, 202 when some are, 409 when none is, 413 when a part is over the size limit or the
    request holds over :data:`MAX_PARTS` parts (the rest of the body is not read), 400/415 for
    a request that is not a STOW-RS request."""
    study = request.match_info.get("study")
    refusal = _check_request(study, request.headers.get(hdrs.CONTENT_TYPE, ""))
    if refusal is not None:
        return refusal
    ctx = request.config_dict[CONTEXT]
    stow = _Request(ctx, study, request.content, request)
    ended_early = False
    try:
        await _receive_all(_TolerantReader(request.headers, request.content), stow)
    except (ConnectionError, HttpProcessingError):  # the peer went away mid-body
        logger.warning("STOW-RS request from %s ended before its body (%d part(s) handled)",
                       request.remote, len(stow.outcomes))
        ended_early = True
    except TimeoutError:
        logger.warning("STOW-RS request from %s sent nothing for %g s: cut (%d part(s) handled)",
                       request.remote, IDLE_SECONDS, len(stow.outcomes))
        await offload(request, _audit, stow, request.remote or "", False)
        return await _cut(request, 408, f"the body stalled: nothing for {IDLE_SECONDS:g} s\n")
    except (ValueError, AssertionError, RuntimeError) as exc:  # aiohttp's words for broken framing
        if not stow.outcomes:
            return web.Response(status=400, text=f"malformed multipart body: {exc}\n")
        stow.outcomes.append(Outcome(StoreStatus.CANNOT_UNDERSTAND, "malformed multipart body"))
    await offload(request, _audit, stow, request.remote or "", not ended_early)
    if ended_early:
        return web.Response(status=400, text="request body ended early\n")
    if not stow.outcomes:
        return web.Response(status=400, text="no part in the multipart body\n")
    return _response(stow, base_url(request))


async def _cut(request: web.Request, status: int, reason: str) -> web.Response:
    """Answer, then close the connection: aiohttp would otherwise keep reading (and
    discarding) the rest of the body for a while before it closes."""
    answer = web.Response(status=status, text=reason)
    answer.force_close()
    await answer.prepare(request)
    await answer.write_eof()
    if request.transport is not None:
        request.transport.close()  # what is buffered (the answer) goes out first
    return answer


def _audit(stow: _Request, address: str, complete: bool) -> None:
    """Record the request as ``stow_received``. Its study is the one of the path or, for
    ``POST /studies``, the one study its instances belong to, so the study's history
    (``dicom-node history``) shows how they came in; ``study_instance_uids`` lists them all."""
    studies = sorted({o.record.study_instance_uid for o in stow.outcomes if o.record is not None})
    study = stow.study or (studies[0] if len(studies) == 1 else "")
    stow.ctx.audit.record("stow_received", address=address, study_instance_uid=study,
                          study_instance_uids=studies, stored=sum(o.stored for o in stow.outcomes),
                          failed=sum(not o.stored for o in stow.outcomes), complete=complete)


def _check_request(study: str | None, content_type: str) -> web.Response | None:
    """400 for an invalid Study Instance UID in the path, else :func:`_check_content_type`."""
    if study is not None:
        try:
            check_uid("StudyInstanceUID", study)
        except InvalidInstanceError as exc:
            return web.Response(status=400, text=f"{exc}\n")
    return _check_content_type(content_type)


def _check_content_type(value: str) -> web.Response | None:
    """415 unless ``multipart/related; type="application/dicom"``; 400 without a boundary."""
    mime = parse_mimetype(value)
    if (mime.type, mime.subtype) != ("multipart", "related"):
        return web.Response(status=415, text='expected multipart/related; type="application/dicom"\n')
    if mime.parameters.get("type", "").strip('"').lower() != DICOM:
        return web.Response(
            status=415, text='only type="application/dicom" parts (Part 10 files) are supported\n')
    if not mime.parameters.get("boundary"):
        return web.Response(status=400, text="multipart/related without a boundary\n")
    return None


async def _receive_all(reader: MultipartReader, stow: _Request) -> None:
    """Receive each part while the one before is being accepted (at most one in flight)."""
    pending: Awaitable[Outcome] | None = None
    parts = 0
    try:
        while (part := await asyncio.wait_for(reader.next(), IDLE_SECONDS)) is not None:
            parts += 1
            if parts > MAX_PARTS:
                stow.too_many = True
                return  # 413: the rest of the body is not read
            received = await _receive_part(part, stow)
            if pending is not None:
                stow.outcomes.append(await pending)
                pending = None
            if isinstance(received, Outcome):
                stow.outcomes.append(received)
            else:
                counted = stow.ctx.accepts.submitted()  # counted here, before any thread: see InFlight
                pending = asyncio.ensure_future(
                    offload(stow.http, _accept_file, received, stow.ctx, stow.study, counted))
                pending.add_done_callback(partial(_drop, counted))
            if stow.too_large:
                return  # 413: the rest of the body is not read
    finally:
        if pending is not None:  # a thread cannot be stopped: let it finish and clean up
            stow.outcomes.append(await pending)
        if stow.too_many:
            stow.outcomes.append(Outcome(StoreStatus.OUT_OF_RESOURCES,
                                         f"over {MAX_PARTS} parts in one request: the rest was not read"))


async def _receive_part(part: MultipartReader | BodyPartReader, stow: _Request) -> Path | Outcome:
    """A part's bytes in a temporary file, or why the part is refused before it is accepted."""
    if not isinstance(part, BodyPartReader):
        return Outcome(StoreStatus.CANNOT_UNDERSTAND, "nested multipart part")
    media = parse_mimetype(part.headers.get(hdrs.CONTENT_TYPE, DICOM))
    if f"{media.type}/{media.subtype}" != DICOM:
        return Outcome(StoreStatus.CANNOT_UNDERSTAND,
                       f"part of type {media.type}/{media.subtype}, not {DICOM}")
    limit = stow.ctx.max_instance_size + _META_ROOM
    path = stow.ctx.store.files.tmp / f"{uuid.uuid4().hex}.stow.part"  # *.part: removed at start
    fh = await offload(stow.http, lambda: path.open("xb"))
    try:
        size = await _copy(part, fh, limit, stow)
    except BaseException:
        await offload(stow.http, _close_and_remove, fh, path)
        raise
    await offload(stow.http, fh.close)
    if size <= limit and stow.body.at_eof():
        # a part's end leaves the next delimiter unread; none left means the body was cut
        await offload(stow.http, path.unlink, missing_ok=True)
        raise ValueError("the body ends without its closing delimiter")
    if size > limit:
        await offload(stow.http, path.unlink, missing_ok=True)
        stow.too_large = True
        return Outcome(StoreStatus.OUT_OF_RESOURCES_INSTANCE_TOO_LARGE,
                       f"part exceeds limit {stow.ctx.max_instance_size} bytes (ingest.max_instance_size)")
    return path


async def _copy(part: BodyPartReader, fh: BinaryIO, limit: int, stow: _Request) -> int:
    """Copy the part to ``fh`` in bounded chunks, written off the loop; stop once over ``limit``."""
    size = 0
    buffer = bytearray()
    while chunk := await asyncio.wait_for(part.read_chunk(_READ_CHUNK), IDLE_SECONDS):
        size += len(chunk)
        if size > limit:
            return size
        buffer += chunk
        if len(buffer) >= _WRITE_CHUNK:
            await offload(stow.http, fh.write, bytes(buffer))
            buffer.clear()
    if buffer:
        await offload(stow.http, fh.write, bytes(buffer))
    return size


def _close_and_remove(fh: BinaryIO, path: Path) -> None:
    fh.close()
    path.unlink(missing_ok=True)


def _drop(counted: Accept, _done: object) -> None:
    counted.drop()


def _accept_file(path: Path, ctx: DicomWebContext, study: str | None, counted: Accept) -> Outcome:
    """Accept the Part 10 file at ``path`` (run in a worker thread), counted in ``ctx.accepts``
    until its file is removed too; nothing but the file's removal if the accept was dropped."""
    if not counted.start():
        path.unlink(missing_ok=True)
        return Outcome(StoreStatus.PROCESSING_FAILURE, "the node is stopping")
    try:
        return _accept_and_remove(path, ctx, study)
    finally:
        counted.finish()


def _accept_and_remove(path: Path, ctx: DicomWebContext, study: str | None) -> Outcome:
    try:
        with path.open("rb") as fp:
            offer = _offer(fp, ctx, study)
            if isinstance(offer, Outcome):
                return offer
            return accept(offer, ctx.store, ctx.max_instance_size, ctx.audit)
    except Exception as exc:  # never a 500 for one part: it fails with a reason, the rest go on
        # the type and stack only: the message may quote a value of the data set
        logger.error("STOW-RS part failed unexpectedly: %s\n%s", type(exc).__name__, bare_traceback(exc))
        return Outcome(StoreStatus.PROCESSING_FAILURE, f"internal error: {type(exc).__name__}")
    finally:
        path.unlink(missing_ok=True)


def _offer(fp: BinaryIO, ctx: DicomWebContext, study: str | None) -> Offer | Outcome:
    """The part as an :class:`Offer`: its File Meta Information read from a bounded head (a
    hostile element length cannot make pydicom read the whole part), the data set after it."""
    head = io.BytesIO(fp.read(_META_ROOM))
    try:
        # Tolerant when reading: pydicom 3 (dicomweb-client) writes the meta without the preamble.
        read_preamble(head, force=True)
        found = _read_file_meta_info(head)
    except Exception as exc:  # pydicom raises many types on malformed input; all mean the same
        return Outcome(StoreStatus.CANNOT_UNDERSTAND, f"not a DICOM Part 10 file: {exc}")
    start = head.tell()
    if len(found) == 0:
        return Outcome(StoreStatus.CANNOT_UNDERSTAND, "not a DICOM Part 10 file: no File Meta Information")
    missing = [k for k in ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")
               if not found.get(k)]
    if missing:
        return Outcome(StoreStatus.CANNOT_UNDERSTAND, f"File Meta Information lacks {', '.join(missing)}")
    sop_class, sop_instance = str(found.MediaStorageSOPClassUID), str(found.MediaStorageSOPInstanceUID)
    if sop_class not in STORAGE_SOP_CLASSES:
        return Outcome(StoreStatus.SOP_CLASS_NOT_SUPPORTED,
                       f"SOP class {sop_class[:64]} is not a storage SOP class the node accepts",
                       sop_class_uid=sop_class, sop_instance_uid=sop_instance)
    transfer_syntax = UID(str(found.TransferSyntaxUID))
    if transfer_syntax not in TRANSFER_SYNTAXES:
        return Outcome(StoreStatus.TRANSFER_SYNTAX_NOT_SUPPORTED,
                       f"transfer syntax {transfer_syntax} not supported",
                       sop_class_uid=sop_class, sop_instance_uid=sop_instance)
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = transfer_syntax
    return Offer(file_meta=meta, dataset=fp, calling=ctx.stow_ae_title, sop_class_uid=sop_class,
                 sop_instance_uid=sop_instance, start=start, study_instance_uid=study,
                 declared_as="Media Storage")


def _response(stow: _Request, base: str) -> web.Response:
    """The PS3.18 Store Instances Response (Annex I) as DICOM JSON, with its HTTP status."""
    stored = [o for o in stow.outcomes if o.record is not None]
    failed = [o for o in stow.outcomes if o.record is None]
    body: dict[str, Any] = {
        "00081199": {"vr": "SQ", "Value": [_stored_item(o, base) for o in stored]},
    }
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_failed_item(o) for o in failed]}
    if stow.study is not None and stored:
        body["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{stow.study}"]}
    if stow.too_large or stow.too_many:
        status = 413
    else:
        status = 200 if not failed else 202 if stored else 409
    # no charset parameter: dicomweb-client reads the body only when the type is exactly this
    return web.Response(body=json.dumps(body).encode(), status=status, content_type=DICOM_JSON)


def _uids(outcome: Outcome) -> dict[str, Any]:
    def ui(value: str) -> dict[str, Any]:
        return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}

    return {"00081150": ui(outcome.sop_class_uid), "00081155": ui(outcome.sop_instance_uid)}


def _stored_item(outcome: Outcome, base: str) -> dict[str, Any]:
    record = outcome.record
    assert record is not None
    url = (f"{base}/studies/{record.study_instance_uid}/series/{record.series_instance_uid}"
           f"/instances/{record.sop_instance_uid}")
    return {**_uids(outcome), "00081190": {"vr": "UR", "Value": [url]}}


def _failed_item(outcome: Outcome) -> dict[str, Any]:
    """Failure Reason (0008,1197) is the DIMSE status C-STORE would answer (PS3.18 Table I.2-2);
    Error Comment (0000,0902) says why, as C-STORE's response does."""
    return {**_uids(outcome), "00081197": {"vr": "US", "Value": [int(outcome.status)]},
            "00000902": {"vr": "LO", "Value": [error_comment(outcome.comment)]}}

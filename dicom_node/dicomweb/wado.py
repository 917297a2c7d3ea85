"""WADO-RS (PS3.18 10.4): studies, series and instances as multipart/related in their stored
transfer syntax, metadata as DICOM JSON with bulk data URIs, frames and rendered previews.

Every instance the index holds is retrievable: inputs (``instances/``) and the node's results
(``results/``) alike. Files stream from disk in bounded chunks (:mod:`.multipart`); headers are
read without their pixel data (:mod:`.stored`); the node never transcodes an instance, and
decompresses a frame only when native pixels are asked for (:mod:`.negotiate`).
"""

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from dicom_node.dicomweb import CONTEXT, DicomWebContext, multipart, negotiate
from dicom_node.dicomweb.dicomjson import MEDIA_TYPE, header_json, json_accepted
from dicom_node.dicomweb.http import base_url, failure, natural, uids
from dicom_node.dicomweb.render import MEDIA_TYPES as RENDERED_TYPES
from dicom_node.dicomweb.render import render
from dicom_node.dicomweb.stored import FRAME_MEDIA_TYPES, PIXEL_DATA, Header, bulk_value, frame, read_header
from dicom_node.query.match import Stored, retrieve
from dicom_node.store.keys import Level
from dicom_node.web.work import offload

logger = logging.getLogger(__name__)

_STUDY = "/studies/{study}"
_SERIES = _STUDY + "/series/{series}"
_INSTANCE = _SERIES + "/instances/{instance}"
_DICOM = "application/dicom"
#: The most frames one request may name.
MAX_FRAMES = 10_000


def add_routes(app: web.Application) -> None:
    """Add this service's routes to the DICOMweb sub-application."""
    for path, level in ((_STUDY, Level.STUDY), (_SERIES, Level.SERIES), (_INSTANCE, Level.IMAGE)):
        app.router.add_get(path, partial(instances, level=level), allow_head=False)
        app.router.add_get(path + "/metadata", partial(metadata, level=level), allow_head=False)
    app.router.add_get(_INSTANCE + "/frames/{frames}", frames, allow_head=False)
    app.router.add_get(_INSTANCE + "/rendered", rendered, allow_head=False)
    app.router.add_get(_INSTANCE + "/frames/{frames}/rendered", rendered, allow_head=False)
    app.router.add_get(_INSTANCE + "/bulkdata/{tag}", bulkdata, allow_head=False)


async def _stored(request: web.Request, level: Level) -> list[Stored]:
    """The instances a request names (404 if none)."""
    ctx: DicomWebContext = request.config_dict[CONTEXT]
    path = uids(request)
    identifier = {"StudyInstanceUID": path["study"], "SeriesInstanceUID": path.get("series", ""),
                  "SOPInstanceUID": path.get("instance", "")}
    query = retrieve(identifier, level)
    rows = await offload(request, ctx.store.index.find, query.sql, query.params)
    if not rows:
        uid = path.get("instance") or path.get("series") or path["study"]
        raise failure(404, f"no {level.value.lower()} {uid}")
    return [Stored(*(str(value) for value in row)) for row in rows]


async def _audit(request: web.Request, level: Level, resource: str, rows: list[Stored]) -> None:
    ctx: DicomWebContext = request.config_dict[CONTEXT]
    logger.info("WADO-RS %s at %s level: %d instance(s)", resource, level.value, len(rows))
    await offload(request, ctx.audit.record, "retrieve", service="WADO-RS", address=request.remote or "",
                            level=level.value, resource=resource, instances=len(rows),
                            study_instance_uids=sorted({row.study_instance_uid for row in rows}))


def _file(request: web.Request, row: Stored) -> Path:
    return Path(request.config_dict[CONTEXT].store.data_dir) / row.path


async def instances(request: web.Request, level: Level) -> web.StreamResponse:
    """A study, series or instance as ``multipart/related; type="application/dicom"``, each
    file as stored (406 if the Accept header asks for a transfer syntax some are not in)."""
    rows = await _stored(request, level)
    syntaxes = {row.transfer_syntax_uid for row in rows}
    if not negotiate.dicom_accepted(negotiate.parse(request), syntaxes):
        raise failure(406, "the node sends instances in their stored transfer syntax ("
                      f"{', '.join(sorted(syntaxes))}) and does not transcode: accept "
                      'multipart/related; type="application/dicom"; transfer-syntax=*')
    await _audit(request, level, "instances", rows)
    parts = [multipart.file_part(request, _file(request, row),
                                 f"{_DICOM}; transfer-syntax={row.transfer_syntax_uid}") for row in rows]
    return multipart.response(parts, "application/dicom")


def _metadata(path: Path, base: str, row: Stored) -> dict[str, Any]:
    header = read_header(path)
    ds = header.dataset
    url = f"{base}/studies/{row.study_instance_uid}/series/{ds.get('SeriesInstanceUID', '')}" \
          f"/instances/{row.sop_instance_uid}"
    return header_json(ds, {tag: value.vr for tag, value in header.bulk.items()},
                       lambda tag: f"{url}/bulkdata/{tag:08X}")


async def metadata(request: web.Request, level: Level) -> web.StreamResponse:
    """The headers of a study, series or instance as a DICOM JSON array, pixel data and other
    large binary values by bulk data URI; written an instance at a time."""
    if not json_accepted(entry.media_type for entry in negotiate.parse(request)):
        raise failure(406, f"metadata is sent as {MEDIA_TYPE} only")
    rows = await _stored(request, level)
    base = base_url(request)
    try:
        first = await offload(request, _metadata, _file(request, rows[0]), base, rows[0])
    except Exception as exc:  # a file removed or damaged since it was indexed: nothing sent yet
        logger.warning("cannot read %s: %s", rows[0].sop_instance_uid, type(exc).__name__)
        raise failure(404, f"instance {rows[0].sop_instance_uid} cannot be read") from None
    await _audit(request, level, "metadata", rows)
    response = web.StreamResponse(headers={"Content-Type": MEDIA_TYPE})
    await response.prepare(request)
    await response.write(b"[" + json.dumps(first, separators=(",", ":")).encode())
    for row in rows[1:]:
        item = await offload(request, _metadata, _file(request, row), base, row)
        await response.write(b"," + json.dumps(item, separators=(",", ":")).encode())
    await response.write(b"]")
    await response.write_eof()
    return response


def _frame_numbers(text: str, count: int) -> list[int]:
    """The 1-based frame list of the path (``1,3,5``); 400 if malformed, 404 if out of range."""
    parts = [natural(p.strip()) for p in text.split(",")[:MAX_FRAMES + 1]]
    if len(parts) > MAX_FRAMES or None in parts:
        raise failure(400, f"expected a comma list of frame numbers, not {text[:40]!r}")
    numbers = [n for n in parts if n is not None]
    wrong = [n for n in numbers if not 1 <= n <= count]
    if wrong:
        raise failure(404, f"frame {wrong[0]} is not one of the instance's frames 1 to {count}")
    return numbers


async def _header(request: web.Request) -> tuple[Path, Header, Stored]:
    (row,) = await _stored(request, Level.IMAGE)
    path = _file(request, row)
    try:
        header = await offload(request, read_header, path)
    except Exception as exc:  # a file removed or damaged since it was indexed
        logger.warning("cannot read %s: %s", row.sop_instance_uid, type(exc).__name__)
        raise failure(404, f"instance {row.sop_instance_uid} cannot be read") from None
    return path, header, row


async def frames(request: web.Request) -> web.StreamResponse:
    """Frames of an instance as ``multipart/related``: native (application/octet-stream,
    Explicit VR Little Endian; decompressed if stored compressed) or as stored where the Accept
    header allows the stored syntax's media type or ``transfer-syntax=*``."""
    path, header, row = await _header(request)
    if header.pixels is None:
        raise failure(404, f"instance {row.sop_instance_uid} has no pixel data")
    numbers = _frame_numbers(request.match_info["frames"], header.frames)
    syntax = str(header.transfer_syntax)
    media = FRAME_MEDIA_TYPES.get(syntax) if header.transfer_syntax.is_encapsulated else None
    if header.transfer_syntax.is_encapsulated and media is None:
        media = "application/octet-stream"
    choice = negotiate.frame_choice(negotiate.parse(request), syntax, media)
    if choice is None:
        raise failure(406, f"frames of this instance are sent as application/octet-stream "
                      f"(transfer-syntax={negotiate.NATIVE}) or {media or 'application/octet-stream'} "
                      f"(transfer-syntax={syntax}); the node transcodes no other way")
    how, sent_syntax = choice
    part_type = "application/octet-stream" if how == "native" else str(media)
    content_type = f"{part_type}; transfer-syntax={sent_syntax}"
    await _audit(request, Level.IMAGE, "frames", [row])
    parts = [_frame_part(request, path, header, n - 1, how == "native", content_type) for n in numbers]
    return multipart.response(parts, part_type)


def _frame_part(request: web.Request, path: Path, header: Header, index: int, native: bool,
                content_type: str) -> Any:
    pixels, size = header.pixels, header.frame_size
    addressable = pixels is not None and pixels.offset is not None and size is not None
    if addressable and not header.transfer_syntax.is_encapsulated and header.transfer_syntax.is_little_endian:
        assert pixels is not None and pixels.offset is not None and size is not None
        return multipart.file_part(request, path, content_type, pixels.offset + index * size, size)
    return multipart.computed_part(request, partial(frame, path, header, index, native=native), content_type)


def _rendered_type(request: web.Request) -> str:
    for entry in negotiate.parse(request):
        if entry.media_type in RENDERED_TYPES:
            return entry.media_type
        if entry.media_type in ("*/*", "image/*"):
            return "image/jpeg"  # PS3.18 8.7.4: the default rendered media type (single frame)
    raise failure(406, f"rendered images are sent as {' or '.join(RENDERED_TYPES)}")


async def rendered(request: web.Request) -> web.StreamResponse:
    """One frame (the first, at instance level) as PNG or JPEG; ``viewport=W,H`` scales it to
    at most W pixels wide, ``quality`` sets the JPEG quality."""
    media = _rendered_type(request)
    path, header, row = await _header(request)
    if header.pixels is None:
        raise failure(404, f"instance {row.sop_instance_uid} has no pixel data to render")
    index = _frame_numbers(request.match_info.get("frames", "1"), header.frames)
    if len(index) != 1:
        raise failure(400, "one frame at a time is rendered")
    width, quality = _viewport(request), _quality(request)
    try:
        draw = partial(render, path, header.dataset, index[0] - 1, media, width, quality,
                       whole=header.transfer_syntax.is_deflated)
        image = await offload(request, draw)
    except Exception as exc:  # an undecodable frame, or pixels no image file can hold
        logger.warning("cannot render %s: %s", row.sop_instance_uid, type(exc).__name__)
        # 422: the request is fine, the stored pixels are not (406 would blame the Accept header,
        # 500 would invite retries that cannot succeed)
        raise failure(422, f"instance {row.sop_instance_uid} cannot be rendered "
                           f"({type(exc).__name__})") from None
    await _audit(request, Level.IMAGE, "rendered", [row])
    return web.Response(body=image, content_type=media)


def _viewport(request: web.Request) -> int | None:
    text = request.query.get("viewport", "")
    width = text.split(",")[0].strip()
    if not width:
        return None
    number = natural(width)
    if number is None or not 0 < number <= 16384:
        raise failure(400, f"viewport must be W,H in pixels, not {text[:24]!r}")
    return number


def _quality(request: web.Request) -> int:
    text = request.query.get("quality", "90")
    number = natural(text)
    if number is None or not 1 <= number <= 100:
        raise failure(400, f"quality must be 1 to 100, not {text[:24]!r}")
    return number


async def bulkdata(request: web.Request) -> web.StreamResponse:
    """A bulk data URI of :func:`metadata`: the value as one application/octet-stream part
    (pixel data: native frames one per part, or the stored frames when compressed)."""
    text = request.match_info["tag"]
    if len(text) != 8 or not all(c in "0123456789abcdefABCDEF" for c in text):
        raise failure(400, f"expected a tag of 8 hexadecimal digits, not {text[:16]!r}")
    tag = int(text, 16)
    path, header, row = await _header(request)
    value = header.bulk.get(tag)
    if value is None:
        raise failure(404, f"instance {row.sop_instance_uid} has no bulk value {text}")
    await _audit(request, Level.IMAGE, "bulkdata", [row])
    if tag == PIXEL_DATA:
        compressed = header.transfer_syntax.is_encapsulated
        syntax = str(header.transfer_syntax) if compressed else negotiate.NATIVE
        part_type = FRAME_MEDIA_TYPES.get(syntax, "application/octet-stream") if compressed \
            else "application/octet-stream"
        content_type = f"{part_type}; transfer-syntax={syntax}"
        return multipart.response([_frame_part(request, path, header, n, False, content_type)
                                   for n in range(header.frames)], part_type)
    if value is not None and value.offset is not None:
        part = multipart.file_part(request, path, "application/octet-stream", value.offset, value.length)
    else:
        part = multipart.computed_part(request, partial(bulk_value, path, header, tag),
                                       "application/octet-stream")
    return multipart.response([part], "application/octet-stream")

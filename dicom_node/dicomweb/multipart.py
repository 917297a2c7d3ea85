"""``multipart/related`` answers built by aiohttp's :class:`~aiohttp.MultipartWriter`, whose parts
stream from files: a part opens its file only when aiohttp writes it, and reads it in bounded
chunks off the event loop (within the request's work slots, :mod:`dicom_node.web.work`),
so a series of any size passes through a few chunks of memory.
"""

from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from aiohttp import MultipartWriter, hdrs, web
from aiohttp.payload import AsyncIterablePayload, Payload

from dicom_node.web.work import offload

#: Bytes read from a file at a time.
CHUNK = 256 * 1024


async def _chunks(request: web.Request, path: Path, offset: int, length: int | None) -> AsyncIterator[bytes]:
    """``length`` bytes of ``path`` from ``offset`` (to its end if None), a chunk at a time."""
    fp = await offload(request, lambda: path.open("rb"))
    try:
        if offset:
            await offload(request, fp.seek, offset)
        remaining = length
        while remaining is None or remaining > 0:
            chunk = await offload(request, fp.read, CHUNK if remaining is None else min(CHUNK, remaining))
            if not chunk:
                if remaining:
                    raise OSError(f"{path.name} ended {remaining} bytes early")
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk
    finally:
        await offload(request, fp.close)


def file_part(request: web.Request, path: Path, content_type: str, offset: int = 0,
              length: int | None = None) -> Payload:
    """A part holding ``length`` bytes of ``path`` from ``offset`` (the whole file by default)."""
    return AsyncIterablePayload(_chunks(request, path, offset, length), content_type=content_type)


def computed_part(request: web.Request, compute: Callable[[], bytes], content_type: str) -> Payload:
    """A part whose bytes ``compute`` makes (in a thread) when aiohttp writes it: one frame at a
    time is in memory, however many frames are asked for."""

    async def one() -> AsyncIterator[bytes]:
        yield await offload(request, compute)

    return AsyncIterablePayload(one(), content_type=content_type)


def response(parts: Iterable[Payload], part_type: str) -> web.Response:
    """A ``multipart/related; type="part_type"`` answer of ``parts``, written as aiohttp streams
    the body."""
    writer = MultipartWriter("related")
    for part in parts:
        writer.append_payload(part)
    content_type = f'multipart/related; type="{part_type}"; boundary="{writer.boundary}"'
    return web.Response(body=writer, headers={hdrs.CONTENT_TYPE: content_type})

"""The Accept header of a WADO-RS request (PS3.18 8.7), read as the media types and transfer
syntaxes it allows, and the choices the node makes from them. The node never transcodes between
compressed syntaxes: it sends what is stored, or decompresses a frame to native pixels."""

from dataclasses import dataclass

from aiohttp import web

ANY = "*"
#: The transfer syntax of native frames the node sends (PS3.18 8.7.3: the default of
#: application/octet-stream).
NATIVE = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class Acceptable:
    """One entry of the Accept header: the media type of each part (``type``; the media type
    itself when it is not multipart) and the transfer syntax asked for (None: the default)."""

    media_type: str
    part_type: str
    transfer_syntax: str | None


def parse(request: web.Request) -> list[Acceptable]:
    """The Accept header's entries, in order (``*/*`` when it is absent); quality factors are
    ignored (entries with q=0 dropped)."""
    found: list[Acceptable] = []
    for entry in (request.headers.get("Accept") or "*/*").split(","):
        media, *params = [part.strip() for part in _split(entry)]
        values = {k.strip().lower(): v.strip().strip('"') for k, _, v in (p.partition("=") for p in params)}
        if values.get("q", "1").strip() in ("0", "0.0", "0.00", "0.000") or not media:
            continue
        media = media.lower()
        part = values.get("type", "").lower() if media == "multipart/related" else media
        found.append(Acceptable(media, part or ANY, values.get("transfer-syntax")))
    return found


def _split(entry: str) -> list[str]:
    """An entry's ``;``-separated parts, quotes respected (``type="application/dicom"``)."""
    parts, current, quoted = [], "", False
    for char in entry:
        if char == '"':
            quoted = not quoted
        if char == ";" and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def _wildcard(part_type: str, wanted: str) -> bool:
    return part_type in (ANY, "*/*", wanted) or part_type == wanted.split("/")[0] + "/*"


_DICOM_RANGES = frozenset({"*/*", "multipart/*", "multipart/related", "application/dicom", "application/*"})


def dicom_accepted(accept: list[Acceptable], stored: set[str]) -> bool:
    """Whether instances stored in ``stored`` transfer syntaxes may be sent as they are:
    ``application/dicom`` parts with ``transfer-syntax=*``, none (the node's default: as
    stored), or the one syntax every instance is stored in."""
    for entry in accept:
        if entry.media_type in _DICOM_RANGES and _wildcard(entry.part_type, "application/dicom") \
                and (entry.transfer_syntax in (None, ANY) or stored == {entry.transfer_syntax}):
            return True
    return False


def frame_choice(accept: list[Acceptable], stored: str, media_type: str | None) -> tuple[str, str] | None:
    """How to send the frames of an instance stored in ``stored`` (compressed: its frame
    ``media_type``; native: None): ("native", NATIVE) or ("stored", stored syntax), or None
    if no entry of the Accept header allows either."""
    for entry in accept:
        ts = entry.transfer_syntax
        if media_type is None:  # native in the file: sent native, whatever else was allowed
            if _wildcard(entry.part_type, "application/octet-stream") and ts in (None, ANY, NATIVE, stored):
                return "native", NATIVE
            continue
        if entry.part_type == media_type and ts in (None, ANY, stored):
            return "stored", stored
        if _wildcard(entry.part_type, "application/octet-stream"):
            if ts == ANY or (entry.part_type in (ANY, "*/*") and ts is None):
                return "stored", stored
            if ts in (None, NATIVE):
                return "native", NATIVE
    return None

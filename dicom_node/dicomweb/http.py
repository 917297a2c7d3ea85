"""What QIDO-RS and WADO-RS handlers share: failures as PS3.18 status codes with a short reason,
the service's own base URL (for Retrieve URLs and bulk data URIs), and UIDs from the path."""

import re

from aiohttp import web

from dicom_node.dicomweb import CONTEXT
from dicom_node.store.files import InvalidInstanceError, check_uid

#: A natural number as the node reads one from a URL: ASCII digits only (``str.isdigit`` also
#: takes "²" and other digits ``int`` refuses), at most 9 of them (no huge integers to convert).
_NATURAL = re.compile(r"[0-9]{1,9}")
#: The first path segment of every DICOMweb resource (PS3.18 10.4, 10.6): what follows the mount.
_RESOURCE = re.compile(r"/(studies|series|instances)(/|$)")


def failure(status: int, reason: str) -> web.HTTPException:
    """An HTTP error with ``reason`` as its plain-text body (one line, no traceback, no values
    from a patient's header)."""
    cls = web.HTTPException
    for candidate in (web.HTTPBadRequest, web.HTTPNotFound, web.HTTPNotAcceptable, web.HTTPServiceUnavailable,
                      web.HTTPInternalServerError):
        if candidate.status_code == status:
            cls = candidate
    error = cls(text=reason[:500], content_type="text/plain")
    if cls is web.HTTPException:
        error.set_status(status)
    return error


def natural(text: str) -> int | None:
    """``text`` as a non-negative integer, or None if it is not 1 to 9 ASCII digits."""
    return int(text) if _NATURAL.fullmatch(text) else None


def base_url(request: web.Request) -> str:
    """The DICOMweb service root as the client reached it: its scheme and host, and the prefix
    the sub-application is mounted at (``http://node:8080/dicom-web``); behind a reverse proxy,
    ``web.public_url`` and that prefix (``https://pacs.example.org/node/dicom-web``)."""
    canonical = request.match_info.route.resource.canonical if request.match_info.route.resource else ""
    found = _RESOURCE.search(canonical)
    prefix = canonical[:found.start()] if found else ""
    public = request.config_dict[CONTEXT].public_url
    if public:
        return public + prefix
    return f"{request.scheme}://{_host(request)}{prefix}"


def _host(request: web.Request) -> str:
    """The Host header, with the port the connection came in on where the header leaves it out
    and it is not the scheme's default: some clients (dicomweb-client 0.61) send the host name
    alone, and a URL without the port would point them at another server."""
    host = request.host
    if host.startswith("[") and "]" in host:
        has_port = host.rsplit("]", 1)[1].startswith(":")
    else:
        has_port = ":" in host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if has_port or not sockname:
        return host
    port = int(sockname[1])
    return host if port == {"http": 80, "https": 443}.get(request.scheme) else f"{host}:{port}"


def uids(request: web.Request) -> dict[str, str]:
    """The UIDs in the path (``study``, ``series``, ``instance``), checked.

    Raises
    ------
    web.HTTPException
        400 for a malformed UID.
    """
    found: dict[str, str] = {}
    for name in ("study", "series", "instance"):
        if name in request.match_info:
            try:
                found[name] = check_uid(name, request.match_info[name])
            except InvalidInstanceError as exc:
                raise failure(400, str(exc)) from None
    return found

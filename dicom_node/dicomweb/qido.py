"""QIDO-RS (PS3.18 10.6): search for studies, series and instances, matched by
:mod:`dicom_node.query.match` (the C-FIND's matching), answered as DICOM JSON.

Resources: ``/studies``, ``/series``, ``/instances``, ``/studies/{study}/series``,
``/studies/{study}/instances``, ``/studies/{study}/series/{series}/instances``. Query parameters:
match keys by keyword or tag (``PatientName=DOE*``, ``0020000D=1.2.3``; a sequence key's item
attribute as ``ConceptNameCodeSequence.CodeValue``), ``includefield`` (a comma list, repeatable,
``all``), ``limit``, ``offset`` and ``fuzzymatching`` (not supported: answered with a Warning,
literal matching). No match is 200 with an empty array: CP-2473's answer (PS3.18 8.3.4.4.1 says
204 No Content today; the CP restores 200, per RFC 9110 and C-FIND's success); see
docs/conformance.md, "QIDO-RS".
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web
from multidict import MultiMapping
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from dicom_node.dicomweb import CONTEXT, negotiate
from dicom_node.dicomweb.dicomjson import MEDIA_TYPE, columns, element_text, json_accepted, rows_json
from dicom_node.dicomweb.http import base_url, failure, natural, uids
from dicom_node.query.match import Find, QueryError, find, held
from dicom_node.store.index import Index
from dicom_node.store.keys import KEYS, LEVELS, Level
from dicom_node.web.work import offload

logger = logging.getLogger(__name__)

#: The return keys PS3.18 10.6.3 asks for at each level, of those the index holds.
DEFAULT_KEYS = {
    Level.STUDY: ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                  "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                  "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    Level.SERIES: ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
                   "NumberOfSeriesRelatedInstances"),
    Level.IMAGE: ("SOPClassUID", "SOPInstanceUID", "InstanceNumber"),
}
#: Keys of the study a search for all series or all instances answers too (PS3.18 10.6.3).
_STUDY_KEYS = ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "PatientName",
               "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
               "StudyDescription")
#: Parameters that are not match keys.
_CONTROL = frozenset({"includefield", "limit", "offset", "fuzzymatching"})
#: Keys besides UIDs whose value may be a list (comma-separated in QIDO-RS).
_LISTS = frozenset({"ModalitiesInStudy"})
#: The keys that can be matched: the index's, and Modalities in Study (at STUDY level).
_MATCHABLE = {key.keyword: key for key in KEYS}
#: The most results one answer holds when the client sets no ``limit`` (PS3.18 lets the origin
#: server cap it, with a Warning saying more exist).
MAX_RESULTS = 10_000
FUZZY_WARNING = ('299 {host}: "The fuzzymatching parameter is not supported. '
                 'Only literal matching has been performed."')
MORE_WARNING = ('299 {host}: "The number of results exceeded the maximum supported by the server. '
                'Additional results can be requested."')


def add_routes(app: web.Application) -> None:
    """Add this service's routes to the DICOMweb sub-application."""
    for path, level in (("/studies", Level.STUDY), ("/series", Level.SERIES), ("/instances", Level.IMAGE),
                        ("/studies/{study}/series", Level.SERIES),
                        ("/studies/{study}/instances", Level.IMAGE),
                        ("/studies/{study}/series/{series}/instances", Level.IMAGE)):
        app.router.add_get(path, _handler(level), allow_head=False)


def _handler(level: Level) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await search(request, level)
    return handle


def _keyword(name: str) -> str:
    """A keyword for a parameter name given as keyword or tag (``0020000D``)."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
    if tag_for_keyword(name) is not None:
        return name
    raise failure(400, f"{name[:64]!r} is not a DICOM attribute keyword or tag")


def _integer(query: MultiMapping[str], name: str) -> int | None:
    text = query.get(name)
    if text is None or text == "":
        return None
    number = natural(text)
    if number is None:
        raise failure(400, f"{name} must be a non-negative integer, not {text[:24]!r}")
    return number


def parse(query: MultiMapping[str], level: Level, path_uids: Mapping[str, str]) -> dict[str, Any]:
    """The identifier of a search (keyword -> value, as :func:`dicom_node.query.match.find`
    takes it), with the UIDs of the path; a list of UIDs or modalities may be comma-separated
    (PS3.18 UID list matching), as well as backslash-separated as in C-FIND.

    Raises
    ------
    web.HTTPException
        400: an unknown attribute, a key the index cannot match, a key below ``level``, a bad
        ``limit`` or ``offset``.
    """
    identifier: dict[str, Any] = {}
    depth = LEVELS.index(level)
    for name, value in query.items():
        if name in _CONTROL:
            continue
        keyword, _, item = name.partition(".")
        keyword = _keyword(keyword)
        key = _MATCHABLE.get(keyword)
        if value and not (key or (keyword == "ModalitiesInStudy" and level is Level.STUDY)):
            raise failure(400, f"{keyword} is not a supported match key at {level.value} level")
        if key is not None and value and LEVELS.index(key.level) > depth:
            raise failure(400, f"{keyword} is a key of the {key.level.value} level: not a match key of "
                               f"a {level.value}-level search")
        if item:
            if key is None or not key.items or _keyword(item) not in dict(key.items):
                raise failure(400, f"{name[:64]!r} is not a sequence key the node matches")
            identifier[keyword] = [{**(identifier.get(keyword) or [{}])[0], _keyword(item): value}]
        elif keyword in identifier and value:
            raise failure(400, f"{keyword} is given twice")
        else:
            listed = keyword in _LISTS or dictionary_VR(keyword) == "UI"
            identifier[keyword] = value.replace(",", "\\") if listed else value or identifier.get(keyword, "")
    if "study" in path_uids:
        identifier["StudyInstanceUID"] = path_uids["study"]
    if "series" in path_uids:
        identifier["SeriesInstanceUID"] = path_uids["series"]
    return identifier


def includes(query: MultiMapping[str], level: Level, under_study: bool) -> list[str]:
    """The return keys: the level's defaults (and the study's for a search of all series or
    instances), and those ``includefield`` names the index holds at ``level``."""
    wanted = list(DEFAULT_KEYS[level])
    if level is not Level.STUDY and not under_study:
        wanted = [*_STUDY_KEYS, *wanted]
    if level is Level.IMAGE:
        wanted = [*DEFAULT_KEYS[Level.SERIES][:-1], *wanted]
    for value in query.getall("includefield", []):
        for name in value.split(","):
            name = name.strip()
            if name == "all":  # every key the index holds at the level and above
                wanted += [key.keyword for key in KEYS if LEVELS.index(key.level) <= LEVELS.index(level)]
            elif name and held(keyword := _keyword(name), level):
                wanted.append(keyword)  # one the index does not hold is left out, not sent empty
    return list(dict.fromkeys(wanted))


async def search(request: web.Request, level: Level) -> web.StreamResponse:
    """One QIDO-RS search: 200 with the matches (possibly none), 400 for a bad query, 406 when
    the Accept header allows no DICOM JSON (the node sends no XML)."""
    if not json_accepted(entry.media_type for entry in negotiate.parse(request)):
        raise failure(406, f"QIDO-RS results are sent as {MEDIA_TYPE} only")
    ctx = request.config_dict[CONTEXT]
    path_uids = uids(request)
    query = request.query
    identifier = parse(query, level, path_uids)
    include = includes(query, level, "study" in path_uids)
    limit, offset = _integer(query, "limit"), _integer(query, "offset") or 0
    capped = limit is None or limit > MAX_RESULTS
    try:
        found = find(identifier, level=level, limit=(MAX_RESULTS + 1) if capped else limit, offset=offset,
                     include=include)
    except QueryError as exc:
        raise failure(400, str(exc)) from None
    body, studies, matches, more = await offload(request, _answer, ctx.store.index, found, base_url(request),
                                                           level, MAX_RESULTS if capped else None)
    warnings = []
    if query.get("fuzzymatching", "").lower() == "true":
        warnings.append(FUZZY_WARNING.format(host=request.host))
    if more:
        warnings.append(MORE_WARNING.format(host=request.host))
    logger.info("QIDO-RS at %s level: %d match(es)", level.value, matches)  # counts only, never values
    # which studies a client saw (UIDs only), as WADO-RS records what it sent
    await offload(request, ctx.audit.record, "query", service="QIDO-RS", address=request.remote or "",
                            level=level.value, matches=matches, study_instance_uids=studies)
    headers = {"Warning": ", ".join(warnings)} if warnings else {}
    return web.Response(body=body, content_type=MEDIA_TYPE, headers=headers)


def _answer(index: Index, found: Find, base: str, level: Level,
            cap: int | None) -> tuple[bytes, list[str], int, bool]:
    """Run the search and encode its DICOM JSON (both block: run in a thread); (body, the
    Study Instance UIDs answered, number of results, whether the cap cut some off)."""
    rows = index.find(found.sql, found.params)
    more = cap is not None and len(rows) > cap
    rows = rows[:cap] if more else rows
    at = columns(found)
    parts = [("StudyInstanceUID", "studies"), ("SeriesInstanceUID", "series"),
             ("SOPInstanceUID", "instances")][:LEVELS.index(level)]

    def retrieve_url(row: Sequence[object]) -> dict[str, str]:
        """The Retrieve URL (0008,1190) of a result: its WADO-RS resource on this node."""
        path = "".join(f"/{name}/{row[at[keyword]]}" for keyword, name in parts)
        return {"00081190": element_text("UR", base + path)}

    studies = sorted({str(row[at["StudyInstanceUID"]]) for row in rows})
    return rows_json(found, rows, retrieve_url), studies, len(rows), more

"""DICOM JSON (PS3.18 F.2) for DICOMweb answers: query rows straight to JSON (QIDO-RS), and a
stored header with bulk data URIs in place of pixel data and other large values (WADO-RS
``/metadata``), plus the ``application/dicom+json`` response both send.

A QIDO-RS answer over thousands of studies is built from the index rows directly, never through
pydicom ``Dataset`` objects (about ten times slower per attribute); headers use pydicom's
:meth:`~pydicom.dataset.Dataset.to_json_dict`.
"""

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword

from dicom_node.query.match import Find
from dicom_node.store.keys import KEYS

MEDIA_TYPE = "application/dicom+json"
#: Value Representations DICOM JSON carries as JSON numbers (PS3.18 F.2.3).
_NUMBER_VRS = frozenset({"DS", "FL", "FD", "IS", "SL", "SS", "SV", "UL", "US", "UV"})
#: Sequence keys of the index: keyword -> keywords of their first item.
_ITEMS = {key.keyword: tuple(keyword for keyword, _ in key.items) for key in KEYS if key.items}
#: Binary VRs a value may be sent by bulk data URI for.
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


def tag_hex(keyword: str) -> str:
    """A keyword's tag as DICOM JSON names it (``"0020000D"``)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{tag:08X}"


def _vr(keyword: str) -> str:
    vr = dictionary_VR(keyword)
    return vr.split(" or ")[0]  # "US or SS": the index holds no such key; the first will do


def element(keyword: str, value: object) -> dict[str, Any]:
    """One attribute of a query row: ``{"vr": ..., "Value": [...]}``; no ``Value`` when empty."""
    vr = _vr(keyword)
    out: dict[str, Any] = {"vr": vr}
    if value is None or value == "" or vr == "SQ":
        return out
    text = str(value)
    values = text.split("\\") if vr not in ("LT", "ST", "UT", "UR") else [text]
    if vr == "PN":
        out["Value"] = [{"Alphabetic": name} for name in values]
    elif vr in _NUMBER_VRS:
        out["Value"] = [_number(v) for v in values]
    else:
        out["Value"] = values
    return out


def _number(text: str) -> int | float | str:
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else number


def row_json(query: Find, row: Sequence[object]) -> dict[str, Any]:
    """One QIDO-RS result from an index row of ``query`` (:meth:`Find.dataset`'s layout)."""
    out: dict[str, Any] = {}
    values = iter(row)
    for keyword in query.return_keys:
        items = _ITEMS.get(keyword)
        if items is not None:
            item = {tag_hex(k): element(k, v) for k, v in zip(items, values, strict=False)}
            present = any("Value" in attribute for attribute in item.values())
            out[tag_hex(keyword)] = {"vr": "SQ", **({"Value": [item]} if present else {})}
        else:
            out[tag_hex(keyword)] = element(keyword, next(values))
    if any(not str(v).isascii() for e in out.values() for v in e.get("Value", ())):
        out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    return out


def header_json(ds: Dataset, bulk: Mapping[int, str], uri: Callable[[int], str]) -> dict[str, Any]:
    """A stored header as DICOM JSON: ``ds`` (read without its bulk values; what is left of it
    inline) plus a ``BulkDataURI`` for each tag of ``bulk`` (tag -> VR)."""
    out = ds.to_json_dict(bulk_data_threshold=2**31)
    for tag, vr in bulk.items():
        out[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": uri(tag)}
    return dict(sorted(out.items()))


def json_response(body: object, headers: Mapping[str, str] | None = None) -> web.Response:
    """A 200 ``application/dicom+json`` answer."""
    return web.Response(body=json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
                        content_type=MEDIA_TYPE, headers=headers)

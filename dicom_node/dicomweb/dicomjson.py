"""DICOM JSON (PS3.18 F.2) for DICOMweb answers: query rows straight to JSON (QIDO-RS), and a
stored header with bulk data URIs in place of pixel data and other large values (WADO-RS
``/metadata``).

A QIDO-RS answer over thousands of studies is built from the index rows directly, never through
pydicom ``Dataset`` objects (about ten times slower per attribute); headers use pydicom's
:meth:`~pydicom.dataset.Dataset.to_json_dict`.
"""

import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from json.encoder import encode_basestring as _string
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import BaseTag

from dicom_node.query.match import Find
from dicom_node.store.keys import KEYS

logger = logging.getLogger(__name__)

MEDIA_TYPE = "application/dicom+json"
#: Accept header media ranges a DICOM JSON answer satisfies (QIDO-RS and WADO-RS metadata).
JSON_RANGES = frozenset({"*/*", "application/*", MEDIA_TYPE, "application/json"})
#: Value Representations DICOM JSON carries as JSON numbers (PS3.18 F.2.3).
_NUMBER_VRS = frozenset({"DS", "FL", "FD", "IS", "SL", "SS", "SV", "UL", "US", "UV"})
#: Sequence keys of the index: keyword -> keywords of their first item.
_ITEMS = {key.keyword: tuple(keyword for keyword, _ in key.items) for key in KEYS if key.items}
#: Binary VRs a value may be sent by bulk data URI for.
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


def json_accepted(media_types: Iterable[str]) -> bool:
    """Whether an Accept header allowing ``media_types`` takes a DICOM JSON answer."""
    return any(media_type in JSON_RANGES for media_type in media_types)


@functools.cache
def tag_hex(keyword: str) -> str:
    """A keyword's tag as DICOM JSON names it (``"0020000D"``)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{tag:08X}"


@functools.cache
def _vr(keyword: str) -> str:
    vr = dictionary_VR(keyword)
    return vr.split(" or ")[0]  # "US or SS": the index holds no such key; the first will do


def element_text(vr: str, value: object) -> str:
    """One attribute's DICOM JSON text, of VR ``vr`` (written as text: a QIDO-RS answer holds tens of
    thousands, and dictionaries passed through ``json.dumps`` cost twice as much)."""
    if value is None or value == "" or vr == "SQ":
        return f'{{"vr":"{vr}"}}'
    text = str(value)
    values = text.split("\\") if "\\" in text and vr not in ("LT", "ST", "UT", "UR") else [text]
    if vr == "PN":
        encoded = ",".join(_person_name(v) for v in values)
    elif vr in _NUMBER_VRS:
        encoded = ",".join(_number(v) for v in values)
    else:
        encoded = ",".join(_string(v) for v in values)
    return f'{{"vr":"{vr}","Value":[{encoded}]}}'


def _person_name(text: str) -> str:
    """One PN value as its DICOM JSON object: its ``=``-separated component groups (PS3.5
    6.2.1.1) as Alphabetic, Ideographic and Phonetic (PS3.18 F.2.2), empty groups left out."""
    groups = zip(("Alphabetic", "Ideographic", "Phonetic"), text.split("=", 2), strict=False)
    return "{" + ",".join(f'"{name}":{_string(group)}' for name, group in groups if group) + "}"


def _number(text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return _string(text)  # a malformed number: sent as the text it is
    if not math.isfinite(number):
        return _string(text)
    return str(int(number)) if number.is_integer() else repr(number)


#: One return key of a query: its tag, VR, first column in the row, and its item's (tag, VR)
#: pairs for a sequence key (None for others).
_Column = tuple[str, str, int, tuple[tuple[str, str], ...] | None]


@functools.cache
def _layout(return_keys: tuple[str, ...]) -> tuple[_Column, ...]:
    """Where each return key lies in a row, once per list of keys."""
    layout, column = [], 0
    for keyword in return_keys:
        items = tuple((tag_hex(k), _vr(k)) for k in _ITEMS[keyword]) if keyword in _ITEMS else None
        layout.append((tag_hex(keyword), _vr(keyword), column, items))
        column += len(items) if items else 1
    return tuple(layout)


def columns(query: Find) -> dict[str, int]:
    """The column of each (non-sequence) return key in ``query``'s rows, by keyword."""
    layout = zip(query.return_keys, _layout(query.return_keys), strict=True)
    return {keyword: column for keyword, (_, _, column, items) in layout if items is None}


def rows_json(query: Find, rows: Sequence[Sequence[object]],
              extra: Callable[[Sequence[object]], Mapping[str, str]] = lambda row: {}) -> bytes:
    """QIDO-RS results from index rows of ``query`` (:meth:`Find.dataset`'s layout) as one DICOM
    JSON array, attributes in tag order; ``extra(row)`` adds attributes (tag -> DICOM JSON
    text of the element), such as the Retrieve URL.

    Written for an answer of thousands of results (about 60 to 20 ms for 2,000 studies here): a
    text value that repeats (a date, a description) is encoded once per answer, and the order
    of the attributes is worked out once per set of tags, not sorted for every result."""
    layout = _layout(query.return_keys)
    tags = [tag for tag, _, _, _ in layout]
    encoded: dict[tuple[str, str], str] = {}
    orders: dict[tuple[tuple[str, ...], bool], list[tuple[str, int]]] = {}
    results = []
    for row in rows:
        texts = [_element(vr, row[column], encoded) if items is None else _item(items, row, column, encoded)
                 for _, vr, column, items in layout]
        more = extra(row)
        texts += more.values()
        unicode = not "".join([value for value in row if isinstance(value, str)]).isascii()
        if unicode:
            texts.append('{"vr":"CS","Value":["ISO_IR 192"]}')
        shape = (tuple(more), unicode)
        order = orders.get(shape)
        if order is None:
            order = orders[shape] = _order(tags, shape[0], unicode)
        results.append("{" + ",".join([prefix + texts[n] for prefix, n in order]) + "}")
    return ("[" + ",".join(results) + "]").encode()


def _element(vr: str, value: object, encoded: dict[tuple[str, str], str]) -> str:
    """:func:`element_text`, once per text value and VR in ``encoded``."""
    if not isinstance(value, str):
        return element_text(vr, value)
    text = encoded.get((vr, value))
    if text is None:
        text = encoded[(vr, value)] = element_text(vr, value)
    return text


def _item(items: tuple[tuple[str, str], ...], row: Sequence[object], column: int,
          encoded: dict[tuple[str, str], str]) -> str:
    """A sequence key's one item, or an empty sequence when none of its attributes has a value."""
    texts = [(t, _element(v, row[column + n], encoded)) for n, (t, v) in enumerate(items)]
    if not any('"Value"' in text for _, text in texts):
        return '{"vr":"SQ"}'
    item = ",".join(f'"{t}":{text}' for t, text in texts)
    return f'{{"vr":"SQ","Value":[{{{item}}}]}}'


def _order(tags: list[str], extra: tuple[str, ...], unicode: bool) -> list[tuple[str, int]]:
    """(``"tag":``, index in the result's texts) in tag order, for texts of ``tags``, then
    ``extra`` (which win over a return key of the same tag), then Specific Character Set."""
    where = {tag: n for n, tag in enumerate(tags)}
    where.update((tag, len(tags) + n) for n, tag in enumerate(extra))
    if unicode:
        where["00080005"] = len(tags) + len(extra)
    return [(f'"{tag}":', where[tag]) for tag in sorted(where)]


def _dataset_json(ds: Dataset) -> dict[str, Any]:
    """pydicom's :meth:`~pydicom.dataset.Dataset.to_json_dict`, element by element, so that one
    malformed value does not fail the data set (pydicom's own ``suppress_invalid_tags`` drops it
    and logs its value)."""
    out: dict[str, Any] = {}
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset yields its elements, not tags)
        if tag.element == 0:
            continue  # group lengths: not in DICOM JSON
        key = f"{tag:08X}"
        try:
            element = ds[tag]
            if element.VR == "SQ":
                out[key] = {"vr": "SQ", "Value": [_dataset_json(item) for item in element.value]}
            else:
                out[key] = element.to_json_dict(None, 2**31)
        except Exception as exc:  # pydicom raises many types on a malformed value; all mean the same
            logger.warning("metadata: (%s) of %s is not valid for its VR (%s): sent as text", key,
                           ds.get("SOPInstanceUID", "an item"), type(exc).__name__)
            out[key] = _as_text(ds, tag)
    return out


def _as_text(ds: Dataset, tag: BaseTag) -> dict[str, Any]:
    """The element at ``tag`` as DICOM JSON strings, whatever its VR says its values are."""
    raw = ds.get_item(tag)
    vr = str(raw.VR or "UN") if raw is not None else "UN"
    value = getattr(raw, "value", None)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace").strip(" \0").split("\\")
    values = value if isinstance(value, list | tuple) else [] if value in (None, "") else [value]
    return {"vr": vr, "Value": [str(v) for v in values]} if values else {"vr": vr}


def header_json(ds: Dataset, bulk: Mapping[int, str], uri: Callable[[int], str]) -> dict[str, Any]:
    """A stored header as DICOM JSON: ``ds`` (read without its bulk values; what is left of it
    inline) plus a ``BulkDataURI`` for each tag of ``bulk`` (tag -> VR).

    Tolerant when reading (PS3.18): an attribute whose stored value DICOM JSON cannot carry as
    its VR says (a DS of letters) is sent as the text it holds, as QIDO-RS sends such a value
    (:func:`element_text`), with a warning naming its tag, never its value."""
    out = _dataset_json(ds)
    for tag, vr in bulk.items():
        out[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": uri(tag)}
    return dict(sorted(out.items()))

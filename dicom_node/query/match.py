"""C-FIND matching (PS3.4 C.2.2.2) as SQL over the store's ``instance_keys`` table (at STUDY level,
its ``study_summary``: a record per study).

The one matching module for every front end: the Q/R SCP (:mod:`dicom_node.query.scp`) and a
later QIDO-RS both call it. It knows no network code: an identifier is a pydicom ``Dataset`` or
a plain mapping of keyword to value (a string as DICOM encodes it, ``\\`` between values, or for
a sequence key a list of mappings), and the result is parameterised SQL plus the keys to return.

API
---
:func:`find` -> :class:`Find`: ``Find.sql`` / ``Find.params`` run on the index
(:meth:`dicom_node.store.index.Index.find`); :meth:`Find.dataset` turns each row into the
response identifier. :func:`retrieve` -> :class:`Find` whose rows are :class:`Stored` (what
C-GET and C-MOVE send).

Matching, per key (an empty value is universal matching and only asks for the key back):

- UI: single value, or a list (``\\``-separated) matched as any of them;
- DA, TM, DT: single value, or a range ``a-b``, ``-b``, ``a-`` (both ends included; a bound of
  a time matches every time it is a prefix of, so ``-1300`` includes 13:00:59);
- PN: single value or wildcard (``*``, ``?``), case-insensitive for ASCII letters (PS3.4 allows
  it, and users type names in any case);
- every other string VR (CS, SH, LO, ...): single value or wildcard, case-sensitive; a value of
  ``*`` alone is universal;
- IS (Series Number, Instance Number): single value, as numbers;
- sequence (Concept Name Code Sequence, Content Template Sequence): each non-empty attribute of
  the first item matches as above; an empty item asks for the sequence back;
- ModalitiesInStudy (STUDY level): the study has a series of any of the listed modalities.

Keys of levels below the query level are not matched (PS3.4 C.4.1.2.1 leaves that out of the
identifier) and come back empty, as do keys the index does not hold. Keys of the query level
and those above it all match (relational within the levels above; the unique keys of the
levels above need not be given).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, cast

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement

from dicom_node.store import summary
from dicom_node.store.keys import INTEGER_KEYWORDS, KEYS, LEVELS, Key, Level

#: The unique key of each level (PS3.4 C.6.1.1 and C.6.2.1).
UNIQUE_KEYS = {Level.PATIENT: "PatientID", Level.STUDY: "StudyInstanceUID",
               Level.SERIES: "SeriesInstanceUID", Level.IMAGE: "SOPInstanceUID"}
_BY_KEYWORD = {key.keyword: key for key in KEYS}
#: What each level's records are grouped by (a patient is its Patient ID).
_GROUP = {Level.PATIENT: ("patient_id",), Level.STUDY: ("study_instance_uid",),
          Level.SERIES: ("study_instance_uid", "series_instance_uid"), Level.IMAGE: ()}
#: Return keys computed from the records of a group: keyword -> (level, SQL aggregate).
_DERIVED = {
    "NumberOfPatientRelatedStudies": (Level.PATIENT, "count(DISTINCT study_instance_uid)"),
    "NumberOfPatientRelatedSeries": (Level.PATIENT,
                                     "count(DISTINCT study_instance_uid || '/' || series_instance_uid)"),
    "NumberOfPatientRelatedInstances": (Level.PATIENT, "count(*)"),
    # the study's record in the store's study_summary (a STUDY-level search reads no other)
    **{keyword: (Level.STUDY, column) for keyword, column in summary.DERIVED.items()},
    "NumberOfSeriesRelatedInstances": (Level.SERIES, "count(*)"),
}
#: Identifier elements that are not keys.
_NOT_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
                       "QueryRetrieveView", "TimezoneOffsetFromUTC"})
_RANGED = frozenset({"DA", "TM", "DT"})
_STUDY_DEPTH = LEVELS.index(Level.STUDY)
# a STUDY-level search reads every column of the keys at or above it from study_summary
assert {column for key in KEYS if LEVELS.index(key.level) <= _STUDY_DEPTH for column in key.columns} <= {
    "study_instance_uid", *summary.ATTRIBUTES}


class QueryError(ValueError):
    """The identifier cannot be matched (a bad level, a missing unique key); the message says why."""


class Stored(NamedTuple):
    """One instance to send: its file (relative to the data folder) and its UIDs."""

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str


@dataclass(frozen=True)
class Find:
    """A query: run ``sql`` with ``params``; each row holds the ``columns`` of ``return_keys``."""

    level: Level
    sql: str
    params: tuple[object, ...]
    return_keys: tuple[str, ...]

    def dataset(self, row: Sequence[object]) -> Dataset:
        """The response identifier for one row (Query/Retrieve Level and the return keys)."""
        ds = Dataset()
        values = iter(row)
        for keyword in self.return_keys:
            key = _BY_KEYWORD.get(keyword)
            if key is not None and key.items:
                item = Dataset()
                for item_keyword, _ in key.items:
                    item.add(_element(item_keyword, str(next(values) or "")))
                setattr(ds, keyword, [item] if any(element.value for element in item) else [])
            else:
                value = next(values)
                ds.add(_element(keyword, "" if value is None else str(value)))
        if any(not str(element.value).isascii() for element in ds.iterall() if element.VR != "SQ"):
            ds.SpecificCharacterSet = "ISO_IR 192"
        ds.QueryRetrieveLevel = self.level.value
        return ds


#: VRs whose empty return value is None, not "" (pydicom warns on "" for a binary value).
_BINARY_VRS = frozenset({"AT", "FD", "FL", "OB", "OD", "OF", "OL", "OV", "OW", "SL", "SS", "SV", "UL",
                         "UN", "US", "UV"})


def _element(keyword: str, value: str) -> DataElement:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    vr = dictionary_VR(keyword)
    if vr == "SQ":
        return DataElement(tag, vr, [])  # a sequence the index does not hold
    if vr.split()[0] in _BINARY_VRS:  # "US or SS", "OB or OW": the first will do for no value
        return DataElement(tag, vr.split()[0], None)  # the index holds no binary key: empty
    many = "\\" in value and vr not in ("LT", "ST", "UT")
    return DataElement(tag, vr, value.split("\\") if many else value)


def level_of(identifier: Dataset | Mapping[str, object]) -> Level:
    """The identifier's Query/Retrieve Level; :class:`QueryError` if it is missing or unknown."""
    value = str(_values(identifier).get("QueryRetrieveLevel", "")).strip().upper()
    try:
        return Level(value)
    except ValueError:
        raise QueryError(f"Query/Retrieve Level {value[:16]!r} is not one of "
                         f"{', '.join(level.value for level in LEVELS)}") from None


def find(identifier: Dataset | Mapping[str, object], level: Level | None = None,
         limit: int | None = None, offset: int = 0, include: Sequence[str] = (),
         patient_root: bool = False) -> Find:
    """The C-FIND query for ``identifier`` at ``level`` (default: its Query/Retrieve Level).

    ``limit`` and ``offset`` page the matches (QIDO-RS); ``include`` names more return keys
    (QIDO-RS ``includefield``; ``"all"`` for every key the level holds); ``patient_root``
    answers the Patient ID at every level (Patient Root information model).

    Raises
    ------
    QueryError
        The level is missing or unknown, or a keyword is unknown.
    """
    values = _values(identifier)
    level = level or level_of(identifier)
    depth = LEVELS.index(level)
    unknown = [k for k in (*values, *include) if k != "all" and tag_for_keyword(k) is None]
    if unknown:
        raise QueryError(f"unknown keyword {unknown[0][:64]!r} in the identifier")
    where, params, modalities = _conditions(values, depth)
    wanted = [k for k in values if k not in _NOT_KEYS]
    wanted += [k for k in _included(include, depth) if k not in wanted]
    unique = [UNIQUE_KEYS[lv] for lv in LEVELS[1:depth + 1] if UNIQUE_KEYS[lv] not in wanted]
    if (level is Level.PATIENT or patient_root) and "PatientID" not in wanted:
        unique.insert(0, "PatientID")
    return_keys = tuple(unique + wanted)
    group = _GROUP[level]
    select = [_select(keyword, depth, group) for keyword in return_keys]
    columns = ", ".join(column for part in select for column in part)
    sql = f"SELECT {columns} {_source(level, where, len(modalities))}"
    sql += f" ORDER BY {', '.join(group or ('study_instance_uid', 'series_instance_uid', 'instance_number'))}"
    if limit is not None or offset:
        sql += f" LIMIT {-1 if limit is None else int(limit)} OFFSET {max(0, int(offset))}"
    return Find(level, sql, (*params, *modalities), return_keys)


def _source(level: Level, where: list[str], modalities: int) -> str:
    """FROM, WHERE and GROUP BY of a find at ``level``: the store's ``study_summary`` at STUDY
    level (a record per study, :func:`dicom_node.store.summary.study_source`), else
    ``instance_keys``."""
    if level is Level.STUDY:
        return summary.study_source(where, modalities)
    group = _GROUP[level]
    sql = "FROM instance_keys"
    if group and where:
        # Counts and the group's attributes come from every record of a matched group, not
        # only from the records the keys matched: select the groups first.
        columns = ", ".join(group)
        sql += f" WHERE ({columns}) IN (SELECT {columns} FROM instance_keys WHERE {' AND '.join(where)})"
    elif where:
        sql += f" WHERE {' AND '.join(where)}"
    return sql + (f" GROUP BY {', '.join(group)}" if group else "")


def held(keyword: str, level: Level) -> bool:
    """Whether the index gives return key ``keyword`` a value at ``level`` (C-FIND answers any
    other empty; QIDO-RS leaves it out)."""
    return any(column != "NULL" for column in _select(keyword, LEVELS.index(level), ()))


def _included(include: Sequence[str], depth: int) -> list[str]:
    """The extra return keys ``include`` names (``"all"``: every key of the level and above)."""
    if "all" in include:
        return [key.keyword for key in KEYS if LEVELS.index(key.level) <= depth]
    return list(include)


def retrieve(identifier: Dataset | Mapping[str, object], level: Level | None = None) -> Find:
    """The instances a C-GET or C-MOVE sends: its rows are :class:`Stored` fields.

    The unique keys (PS3.4 C.4.2.2.1) select: the level's own is required, and each one given
    must be a single value or a list of UIDs, never a wildcard (a retrieve names what it wants;
    ``*`` must not move a whole patient or the whole index). Other keys narrow the selection.

    Raises
    ------
    QueryError
        The level is missing or unknown, the identifier lacks the level's unique key, or a
        unique key holds a wildcard (or, for Patient ID, several values).
    """
    values = _values(identifier)
    level = level or level_of(identifier)
    unique = UNIQUE_KEYS[level]
    if not str(values.get(unique, "")).strip():
        raise QueryError(f"a retrieve at {level.value} level needs {unique}")
    for keyword in UNIQUE_KEYS.values():
        value = str(values.get(keyword, "") or "")
        if "*" in value or "?" in value or (keyword == "PatientID" and "\\" in value):
            raise QueryError(f"{keyword} of a retrieve must be a single value"
                             + (" or a list of UIDs" if keyword != "PatientID" else "") + ", not a wildcard")
    where, params, _ = _conditions(values, LEVELS.index(level))
    assert where  # the unique key above is a term: never a retrieve of everything
    sql = (f"SELECT {', '.join(Stored._fields)} FROM instance_keys WHERE {' AND '.join(where)} "
           "ORDER BY study_instance_uid, series_instance_uid, instance_number")
    return Find(level, sql, tuple(params), ())


def _values(identifier: Dataset | Mapping[str, object]) -> dict[str, object]:
    """Keyword -> value: text as DICOM encodes it, a list of mappings for a sequence."""
    if not isinstance(identifier, Dataset):
        return dict(identifier)
    values: dict[str, object] = {}
    for element in identifier:
        if not element.keyword or element.tag.group == 0x0002:
            continue
        if element.VR == "SQ":
            values[element.keyword] = [_values(item) for item in element.value]
        elif element.VM > 1:
            values[element.keyword] = "\\".join(str(v) for v in element.value)
        else:
            values[element.keyword] = "" if element.value is None else str(element.value)
    return values


def _select(keyword: str, depth: int, group: tuple[str, ...]) -> tuple[str, ...]:
    """The SQL expressions of one return key (NULL where it is below the level or unknown). In
    a group, an attribute is the group's non-empty value (results may leave some out): its
    ``max``, since '' sorts below every other text. At STUDY level and below, a study's
    attributes are its ``study_summary`` record's, that same value kept by the store."""
    key = _BY_KEYWORD.get(keyword)
    if key is not None:
        if LEVELS.index(key.level) > depth:
            return tuple("NULL" for _ in key.columns)
        if depth == _STUDY_DEPTH:
            return key.columns  # the summary's columns are named as the records'
        if LEVELS.index(key.level) <= _STUDY_DEPTH < depth:
            # a study's attribute below study level: from the whole study (a result's series
            # may lack what its inputs hold)
            return tuple(summary.study_attribute(column, "instance_keys.study_instance_uid")
                         for column in key.columns)
        if group and key.column not in group:
            return tuple(f"coalesce(max({column}), '')" if keyword not in INTEGER_KEYWORDS
                         else f"max({column})" for column in key.columns)
        return key.columns
    derived = _DERIVED.get(keyword)
    if derived is not None and LEVELS.index(derived[0]) == depth:
        return (derived[1],)
    return ("NULL",)


def _conditions(values: Mapping[str, object], depth: int) -> tuple[list[str], list[object], list[str]]:
    """Terms on ``instance_keys`` records and their parameters for the keys at or above
    ``depth``, then the modalities of Modalities in Study (STUDY level: the study has a series
    of one of them)."""
    where: list[str] = []
    params: list[object] = []
    modalities: list[str] = []
    for keyword, value in values.items():
        key = _BY_KEYWORD.get(keyword)
        if key is not None and LEVELS.index(key.level) <= depth:
            for term, args in _key_terms(key, value):
                where.append(term)
                params.extend(args)
        elif keyword == "ModalitiesInStudy" and depth == LEVELS.index(Level.STUDY):
            modalities = [m.strip() for m in str(value or "").split("\\") if m.strip()]
    return where, params, modalities


def _key_terms(key: Key, value: object) -> list[tuple[str, list[object]]]:
    if key.items:
        items = cast(Sequence[Mapping[str, object]], value or [])
        if not items:
            return []
        first = items[0]
        terms = [_term(column, dictionary_VR(keyword), keyword, str(first.get(keyword) or ""))
                 for keyword, column in key.items]
    else:
        terms = [_term(key.column, dictionary_VR(key.keyword), key.keyword, str(value or ""))]
    return [term for term in terms if term is not None]


def _term(column: str, vr: str, keyword: str, raw: str) -> tuple[str, list[object]] | None:
    """One key's SQL term, or None for universal matching."""
    value = raw.strip()
    if not value or value == "*":
        return None
    if vr == "UI":
        uids = [uid.strip() for uid in value.split("\\") if uid.strip()]
        return f"{column} IN ({', '.join('?' * len(uids))})", list(uids)
    if value == '""':  # empty value matching (PS3.4 C.2.2.2.7): the attribute has no value
        return f"({column} IS NULL OR {column} = '')", []
    if "\\" in value:  # several values: any of them (as a list of UIDs)
        terms = [_term(column, vr, keyword, one) for one in value.split("\\")]
        if any(term is None for term in terms):
            return None
        given = [term for term in terms if term is not None]
        return "(" + " OR ".join(term for term, _ in given) + ")", [arg for _, args in given for arg in args]
    if keyword in INTEGER_KEYWORDS:
        try:
            return f"{column} = ?", [int(value)]
        except ValueError:
            return "0", []  # no record holds a malformed number
    if vr in _RANGED:
        return _range(column, vr, value)
    if vr == "PN":
        return _name(column, value)
    if "*" in value or "?" in value:
        return f"{column} GLOB ?", [_glob(value)]
    return f"{column} = ?", [value]


def _name(column: str, value: str) -> tuple[str, list[object]]:
    """A person name, case-insensitive; trailing empty components do not count (``Doe^John^``
    is ``Doe^John``; the store keeps names without them, :func:`dicom_node.store.keys.key_values`)."""
    if "*" in value or "?" in value:
        return f"{column} LIKE ? ESCAPE '\\'", [_like(value)]
    return f"{column} = ? COLLATE NOCASE", [value.rstrip("^=")]


def _range(column: str, vr: str, value: str) -> tuple[str, list[object]]:
    """Single value or range matching of a date, time or date-time. Dates compare whole (so
    the study date index serves them); a time's upper bound compares with the same number of
    characters of the stored value (``-1300`` includes 13:00:59), its lower bound with the
    stored value padded with zeros (``130000-`` includes a stored ``1300``)."""
    if "-" not in value or _utc_offset(vr, value):
        return (f"{column} = ?" if vr == "DA" else f"substr({column}, 1, {len(value)}) = ?"), [value]
    low, _, high = value.partition("-")
    terms: list[str] = []
    args: list[object] = []
    if low:
        lower = f"substr({column} || '000000', 1, {len(low)})" if vr == "TM" else column
        terms.append(f"{column} != '' AND {lower} >= ?")
        args.append(low)
    if high:
        upper = column if vr == "DA" else f"substr({column}, 1, {len(high)})"
        terms.append(f"{column} != '' AND {upper} <= ?")
        args.append(high)
    return " AND ".join(terms) or "1", args


def _utc_offset(vr: str, value: str) -> bool:
    """Whether a DT's only ``-`` starts a UTC offset (``20240105120000-0500``), not a range: the
    four digits after it, read as a year, would end the range before it began."""
    if vr != "DT" or value.count("-") != 1:
        return False
    low, _, high = value.partition("-")
    return len(high) == 4 and high.isdigit() and len(low) >= 4 and high < low[:4]


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _glob(value: str) -> str:
    return value.replace("[", "[[]")


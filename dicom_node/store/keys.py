"""The query keys the index holds for every stored instance and every result the node wrote.

:data:`KEYS` is the one table of them: the DICOM keyword, the index column and the query level
(PS3.4 C.6) each belongs to. The query module (:mod:`dicom_node.query.match`) matches on these
columns, the store fills them from instance headers (:func:`key_values`). A sequence key
(Concept Name Code Sequence, Content Template Sequence) is held as one column per item attribute
of its first item.

These values include patient identifiers: they are indexed and answered to authorised peers,
never logged.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from pydicom import Dataset
from pydicom.multival import MultiValue


class Level(StrEnum):
    """Query/Retrieve Level (0008,0052) values, from the top of the hierarchy down."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


#: The levels in hierarchy order.
LEVELS = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)


@dataclass(frozen=True)
class Key:
    """One query key: its keyword, its column, its level; ``items`` (keyword, column) pairs for a
    sequence key, matched and returned as one item."""

    keyword: str
    column: str
    level: Level
    items: tuple[tuple[str, str], ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(column for _, column in self.items) if self.items else (self.column,)


_CODE = (("CodeValue", "concept_code_value"), ("CodingSchemeDesignator", "concept_coding_scheme"),
         ("CodeMeaning", "concept_code_meaning"))
_TEMPLATE = (("TemplateIdentifier", "template_identifier"), ("MappingResource", "template_mapping_resource"))

#: Every key the index holds, in hierarchy order. Unique keys: PatientID, StudyInstanceUID,
#: SeriesInstanceUID, SOPInstanceUID.
KEYS = (
    Key("PatientID", "patient_id", Level.PATIENT),
    Key("PatientName", "patient_name", Level.PATIENT),
    Key("PatientBirthDate", "patient_birth_date", Level.PATIENT),
    Key("PatientSex", "patient_sex", Level.PATIENT),
    Key("StudyInstanceUID", "study_instance_uid", Level.STUDY),
    Key("StudyDate", "study_date", Level.STUDY),
    Key("StudyTime", "study_time", Level.STUDY),
    Key("AccessionNumber", "accession_number", Level.STUDY),
    Key("StudyID", "study_id", Level.STUDY),
    Key("StudyDescription", "study_description", Level.STUDY),
    Key("ReferringPhysicianName", "referring_physician_name", Level.STUDY),
    Key("SeriesInstanceUID", "series_instance_uid", Level.SERIES),
    Key("Modality", "modality", Level.SERIES),
    Key("SeriesNumber", "series_number", Level.SERIES),
    Key("SeriesDescription", "series_description", Level.SERIES),
    Key("SOPInstanceUID", "sop_instance_uid", Level.IMAGE),
    Key("SOPClassUID", "sop_class_uid", Level.IMAGE),
    Key("InstanceNumber", "instance_number", Level.IMAGE),
    Key("ConceptNameCodeSequence", "", Level.IMAGE, _CODE),
    Key("ContentTemplateSequence", "", Level.IMAGE, _TEMPLATE),
    Key("VerificationFlag", "verification_flag", Level.IMAGE),
    Key("CompletionFlag", "completion_flag", Level.IMAGE),
    Key("ContentDate", "content_date", Level.IMAGE),
    Key("ContentTime", "content_time", Level.IMAGE),
)

#: The index's key columns, in :data:`KEYS` order.
KEY_COLUMNS = tuple(column for key in KEYS for column in key.columns)
#: Keys held as integers (IS): compared as numbers.
INTEGER_KEYWORDS = frozenset({"SeriesNumber", "InstanceNumber"})
#: Keys of VR PN: held without trailing empty components (``Doe^John^`` is ``Doe^John``).
PERSON_NAME_KEYWORDS = frozenset({"PatientName", "ReferringPhysicianName"})
#: What a header must be read with to fill the keys (the character set decodes the text).
KEY_TAGS = ("SpecificCharacterSet", *(key.keyword for key in KEYS))


class Kind(StrEnum):
    """Where an indexed instance came from."""

    INPUT = "input"  # received by C-STORE, under data_dir/instances
    RESULT = "result"  # written by the node's pipeline, under data_dir/results


def _text(value: object) -> str:
    """A key's text as DICOM writes it: a multi-valued attribute's values joined by ``\\``
    (``str`` of pydicom's MultiValue is the Python list's text, "['a', 'b']")."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v).strip() for v in value).strip()
    return str(value).strip()


def _integer(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def key_values(ds: Dataset) -> dict[str, object]:
    """The key columns' values of a header: '' for an absent text attribute, None for an absent
    or malformed integer; a sequence key from its first item.

    A value that does not decode counts as absent: a key is for finding an instance, and an
    odd attribute must not stop the instance from being stored.
    """
    values: dict[str, object] = {}
    for key in KEYS:
        try:
            values.update(_values_of(ds, key))
        except Exception:  # pydicom raises many types on malformed values; all mean "absent"
            values.update((column, None if key.keyword in INTEGER_KEYWORDS else "") for column in key.columns)
    return values


def _values_of(ds: Dataset, key: Key) -> dict[str, object]:
    if key.items:
        sequence = ds.get(key.keyword)
        item = sequence[0] if sequence else Dataset()
        return {column: _text(item.get(keyword, "")) for keyword, column in key.items}
    if key.keyword in INTEGER_KEYWORDS:
        return {key.column: _integer(ds.get(key.keyword))}
    text = _text(ds.get(key.keyword, ""))
    return {key.column: text.rstrip("^=") if key.keyword in PERSON_NAME_KEYWORDS else text}


def key_row(values: Mapping[str, object]) -> tuple[object, ...]:
    """The key columns' values in :data:`KEY_COLUMNS` order (None where missing)."""
    return tuple(values.get(column) for column in KEY_COLUMNS)

"""Source headers made fit to copy: one table of rules, each attribute checked, then fixed or dropped.

Every object the node writes takes its patient, study and geometry attributes from a source that
a modality or a PACS sent, and real-world sources carry values that make an output invalid, or
make highdicom raise: Pixel Spacing ``0\\0``, an empty Slice Thickness, no Patient ID, an oblique
Patient Orientation ('PL'), Patient Identity Removed YES without a method, a SOP Class UID
encoded as UN. :func:`clean_header` applies :data:`RULES` to a copy of the source; each rule names
an attribute, what makes its value unfit, and what is done then:

- ``DROP``: removed (optional attributes, and geometry an output cannot carry);
- ``EMPTY``: kept with an empty value (Type 2 attributes: the output must have them);
- ``FIX``: replaced by a value that is valid and says no more than the source did.

Every change is returned as a :class:`HeaderChange` naming the attribute and the reason, never
the value (values are patient data), so that the caller can count and audit it.
"""

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydicom import DataElement, Dataset, config
from pydicom.datadict import dictionary_VR
from pydicom.tag import Tag
from pydicom.valuerep import DA, TM

ORIENTATION_LETTERS = frozenset("LRAPHF")
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
#: How far direction cosines may be from unit length and from orthogonal (PS3.3 C.7.6.2.1.1).
COSINE_TOLERANCE = 0.01
#: Method stated for a de-identified source that names none (Type 1C, PS3.3 C.7.1.1): honest,
#: and no claim about how it was done.
UNSTATED_METHOD = "de-identified by the source; method not stated"


class Action(StrEnum):
    """What was done to an attribute that was unfit to copy."""

    DROP = "dropped"
    EMPTY = "emptied"
    FIX = "fixed"


@dataclass(frozen=True)
class HeaderChange:
    """One attribute of one source changed before it was copied; no value, only names."""

    sop_instance_uid: str
    keyword: str
    tag: str
    action: Action
    reason: str

    def as_record(self) -> dict[str, str]:
        return {"sop_instance_uid": self.sop_instance_uid, "keyword": self.keyword, "tag": self.tag,
                "action": self.action.value, "reason": self.reason}


Check = Callable[[Any, Dataset], str | None]  # (value, dataset) -> why it is unfit, or None


@dataclass(frozen=True)
class Rule:
    """An attribute, the check of its value, and the action taken when the check fails.

    ``fix`` gives the replacement value for :attr:`Action.FIX`; ``required`` adds the attribute
    empty when the source lacks it (Type 2 attributes of the modules every output copies);
    ``also`` names the attributes dropped with it.
    """

    keyword: str
    check: Check
    action: Action
    fix: Callable[[Any, Dataset], Any] | None = None
    required: bool = False
    also: tuple[str, ...] = ()  # dropped with it: a module's attributes that only make sense together


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (bytes, str)) or not hasattr(value, "__iter__"):
        return [str(value)]
    return [str(v) for v in value]


def _positive_numbers(count: int) -> Check:
    def check(value: Any, _: Dataset) -> str | None:
        try:
            numbers = [float(v) for v in _strings(value)]
        except (TypeError, ValueError):
            return "not a decimal number"
        if len(numbers) != count:
            return f"expected {count} value(s), got {len(numbers)}"
        if not all(math.isfinite(n) and n > 0 for n in numbers):
            return "zero, negative or not finite"
        return None
    return check


def _finite_numbers(count: int) -> Check:
    def check(value: Any, _: Dataset) -> str | None:
        try:
            numbers = [float(v) for v in _strings(value)]
        except (TypeError, ValueError):
            return "not a decimal number"
        if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
            return f"expected {count} finite values"
        return None
    return check


def _orientation_cosines(value: Any, dataset: Dataset) -> str | None:
    problem = _finite_numbers(6)(value, dataset)
    if problem:
        return problem
    if "SliceThickness" not in dataset or "PixelSpacing" not in dataset:
        return "a plane without a valid Slice Thickness or Pixel Spacing"
    row, column = [float(v) for v in _strings(value)[:3]], [float(v) for v in _strings(value)[3:]]
    lengths = [math.sqrt(sum(c * c for c in axis)) for axis in (row, column)]
    dot = sum(r * c for r, c in zip(row, column, strict=True))
    if any(abs(length - 1) > COSINE_TOLERANCE for length in lengths) or abs(dot) > COSINE_TOLERANCE:
        return "direction cosines not unit length or not orthogonal"
    return None


def _patient_orientation(value: Any, _: Dataset) -> str | None:
    letters = _strings(value)
    if len(letters) != 2:
        return "expected 2 values"
    # one letter per direction: an oblique one ('PL') is valid in a radiograph, but highdicom's
    # SC and a viewer's side markers take single letters only; geometry that cannot be carried
    # over is dropped, never approximated
    if not all(len(v) == 1 and v in ORIENTATION_LETTERS for v in letters):
        return "not one of L, R, A, P, H, F per direction (oblique or invalid)"
    return None


def _one_of(*allowed: str) -> Check:
    def check(value: Any, _: Dataset) -> str | None:
        return None if str(value or "") in ("", *allowed) else f"not one of {', '.join(allowed)}"
    return check


def _text(max_length: int, forbidden: str = "\\") -> Check:
    def check(value: Any, _: Dataset) -> str | None:
        text = str(value or "")
        if len(text) > max_length:
            return f"longer than {max_length} characters"
        if any(c in text for c in forbidden) or any(ord(c) < 32 and c != "\x1b" for c in text):
            return "contains a backslash or a control character"
        return None
    return check


def _person_name(value: Any, _: Dataset) -> str | None:
    """PS3.5 6.2: up to three component groups of up to five components, 64 characters each."""
    text = str(value or "")
    groups = text.split("=")
    if "\\" in text or len(groups) > 3:
        return "more than one value or more than three component groups"
    if any(len(g) > 64 or g.count("^") > 4 for g in groups):
        return "a component group longer than 64 characters or with more than five components"
    if any(ord(c) < 32 and c != "\x1b" for c in text):
        return "contains a control character"
    return None


def _date_or_time(kind: type) -> Check:
    def check(value: Any, _: Dataset) -> str | None:
        if value in (None, ""):
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kind(str(value), validation_mode=config.RAISE)
        except (ValueError, TypeError):
            return f"not a valid {kind.__name__}"
        return None
    return check


def _uid_text(value: Any) -> str:
    raw = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")
    return raw.rstrip("\x00 ")


def _uid(value: Any, dataset: Dataset) -> str | None:
    return None if isinstance(value, str) and UID_PATTERN.match(value) and len(value) <= 64 else \
        "padded, encoded as UN or not a valid UID"


def _fixed_uid(value: Any, _: Dataset) -> Any:
    text = _uid_text(value)
    return text if UID_PATTERN.match(text) and len(text) <= 64 else None  # None: cannot be fixed


def _deidentification(value: Any, dataset: Dataset) -> str | None:
    if str(value or "") not in ("", "YES", "NO"):
        return "not YES or NO"
    if value == "YES" and not dataset.get("DeidentificationMethod") \
            and not dataset.get("DeidentificationMethodCodeSequence"):
        return "YES without De-identification Method (Type 1C)"
    return None


def _stated_method(value: Any, dataset: Dataset) -> Any:
    if value != "YES":
        return None
    # a new element: the copy shares its elements (an empty method too) with the received source
    dataset[0x00120063] = DataElement(0x00120063, "LO", UNSTATED_METHOD)
    return value


DATES = ("PatientBirthDate", "StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate")
TIMES = ("PatientBirthTime", "StudyTime", "SeriesTime", "ContentTime", "AcquisitionTime")
#: Type 2 attributes of the Patient and General Study modules every output copies: present, empty
#: when the source has none, so highdicom and the IOD find them.
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")

PLANE = ("ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
         "SpacingBetweenSlices", "PositionReferenceIndicator", "SliceLocation")

#: The rules, one per attribute; :func:`clean_header` applies them in this order.
RULES: tuple[Rule, ...] = (
    *(Rule(k, _uid, Action.FIX, _fixed_uid) for k in
      ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")),
    Rule("FrameOfReferenceUID", _uid, Action.FIX, _fixed_uid),
    Rule("PatientName", _person_name, Action.EMPTY, required=True),
    Rule("ReferringPhysicianName", _person_name, Action.EMPTY, required=True),
    Rule("PatientID", _text(64), Action.EMPTY, required=True),
    Rule("StudyID", _text(16), Action.EMPTY, required=True),
    Rule("AccessionNumber", _text(16), Action.EMPTY, required=True),
    Rule("PatientSex", _one_of("M", "F", "O"), Action.EMPTY, required=True),
    *(Rule(k, _date_or_time(DA), Action.EMPTY, required=k in TYPE_2) for k in DATES),
    *(Rule(k, _date_or_time(TM), Action.EMPTY, required=k in TYPE_2) for k in TIMES),
    Rule("PatientIdentityRemoved", _deidentification, Action.FIX, _stated_method),
    Rule("PixelSpacing", _positive_numbers(2), Action.DROP),
    Rule("ImagerPixelSpacing", _positive_numbers(2), Action.DROP),
    # a plane whose geometry cannot be stated in full is not stated at all (the Frame of Reference
    # stays: the image is still in it); SEG and PM need the plane and are not made then
    Rule("SliceThickness", _positive_numbers(1), Action.DROP, also=PLANE),
    Rule("SpacingBetweenSlices", _positive_numbers(1), Action.DROP),
    Rule("PatientOrientation", _patient_orientation, Action.DROP),
    Rule("ImageOrientationPatient", _orientation_cosines, Action.DROP, also=PLANE),
    Rule("ImagePositionPatient", _finite_numbers(3), Action.DROP, also=PLANE),
    Rule("Laterality", _one_of("R", "L"), Action.DROP),
    Rule("BodyPartExamined", _text(16), Action.DROP),
)


@dataclass(frozen=True)
class CleanHeader:
    """A source's copy fit to copy from, and what was changed to make it so."""

    dataset: Dataset
    changes: tuple[HeaderChange, ...]


def clean_header(source: Dataset, rules: tuple[Rule, ...] = RULES) -> CleanHeader:
    """A copy of ``source`` in which every attribute of ``rules`` is valid, fixed or dropped.

    The copy has its own element dictionary; Pixel Data, sequences and the file meta are shared
    with ``source``, which is left as it is (the store keeps what peers send). Cleaning a cleaned
    copy changes nothing.
    """
    clean = Dataset()
    clean.update(source)
    if hasattr(source, "file_meta"):
        clean.file_meta = source.file_meta
    sop = _uid_text(source.get("SOPInstanceUID", ""))
    changes = [change for rule in rules if (change := _apply(clean, rule, sop)) is not None]
    return CleanHeader(clean, tuple(changes))


def _apply(clean: Dataset, rule: Rule, sop: str) -> HeaderChange | None:
    tag = Tag(rule.keyword)
    label = f"({tag.group:04X},{tag.element:04X})"
    if tag not in clean:
        if not rule.required:
            return None
        clean[tag] = DataElement(tag, dictionary_VR(tag), "")
        return HeaderChange(sop, rule.keyword, label, Action.FIX, "missing Type 2 attribute added empty")
    element = clean[tag]
    unknown_vr = element.VR == "UN"
    if unknown_vr:  # a VR the sender did not know: read with the dictionary's
        clean[tag] = DataElement(tag, dictionary_VR(tag), _un_value(element.value))
        element = clean[tag]
    value = element.value
    problem = _problem(rule, value, clean, element.VR)
    if problem is None:
        return HeaderChange(sop, rule.keyword, label, Action.FIX, "encoded as UN") if unknown_vr else None
    action = rule.action
    fixed = rule.fix(value, clean) if action is Action.FIX and rule.fix is not None else None
    if action is Action.FIX and fixed is None:
        action = Action.DROP  # a value that cannot be fixed is not copied
    if action is Action.DROP:
        del clean[tag]
        for keyword in rule.also:
            if keyword in clean:
                delattr(clean, keyword)
    else:
        clean[tag] = DataElement(tag, dictionary_VR(tag), "" if action is Action.EMPTY else fixed)
    return HeaderChange(sop, rule.keyword, label, action, problem)


def _un_value(value: Any) -> Any:
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value or "")
    parts = [part.strip("\x00 ") for part in text.split("\\")]
    return parts if len(parts) > 1 else parts[0]


def _problem(rule: Rule, value: Any, dataset: Dataset, vr: str) -> str | None:
    if vr != dictionary_VR(Tag(rule.keyword)):
        return f"VR {vr} where the dictionary has another"
    try:
        return rule.check(value, dataset)
    except Exception:  # a value too broken to check is unfit: named, never quoted
        return "value cannot be read"


#: Storage SOP classes whose IOD has the Multi-frame module or functional groups: only their
#: frames may be referenced by number (PS3.3 C.7.6.16, C.10.5.1.2).
MULTI_FRAME_CLASSES = frozenset(f"1.2.840.10008.5.1.4.1.1.{suffix}" for suffix in (
    "2.1", "2.2", "3", "3.1", "4.1", "4.3", "4.4", "5", "6.2", "6.3", "7.1", "7.2", "7.3", "7.4",
    "12.1", "12.1.1", "12.2", "12.2.1", "12.3", "13.1.1", "13.1.2", "13.1.3", "13.1.4", "13.1.5",
    "14.1", "14.2", "20", "30", "66.4", "77.1.1.1", "77.1.2.1", "77.1.4.1", "77.1.5.1", "77.1.5.2",
    "77.1.5.4", "77.1.6", "128.1", "130", "481.1",
))


def multi_frame(source: Dataset) -> bool:
    """Whether frames of ``source`` are referenced by number: its class is multi-frame and it
    has more than one frame. A single-frame class that carries Number of Frames is referenced
    as a whole (a Referenced Frame Number there makes the output invalid)."""
    try:
        frames = int(source.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return False
    return _uid_text(source.get("SOPClassUID", "")) in MULTI_FRAME_CLASSES and frames > 1


#: Retired storage classes that modalities still send, and the class that replaced each: highdicom
#: knows only current IODs, so it is given the successor, and the reference put back after.
SUCCESSORS = {
    "1.2.840.10008.5.1.4.1.1.6": "1.2.840.10008.5.1.4.1.1.6.1",  # US Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.3": "1.2.840.10008.5.1.4.1.1.3.1",  # US Multi-frame Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.5": "1.2.840.10008.5.1.4.1.1.20",  # NM Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.77.1": "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Image Storage - Trial (retired)
}


def stand_in(source: Dataset) -> Dataset:
    """``source`` (a cleaned copy) with its retired SOP class replaced by its successor, for
    highdicom; :func:`restore_classes` puts the real class back in what was built from it."""
    successor = SUCCESSORS.get(str(source.get("SOPClassUID", "")))
    if successor is None:
        return source
    copy = Dataset()
    copy.update(source)
    if hasattr(source, "file_meta"):
        copy.file_meta = source.file_meta
    # a new element: the copy shares its elements with the source, which must keep its class
    copy[0x00080016] = DataElement(0x00080016, "UI", successor)
    if successor in MULTI_FRAME_CLASSES and "NumberOfFrames" not in copy:
        copy.NumberOfFrames = 1  # Type 1 in the successor's IOD
    return copy


def restore_classes(ds: Dataset, classes: dict[str, str]) -> None:
    """Every reference in ``ds`` to an instance of ``classes`` (SOP Instance UID -> its real SOP
    Class UID) names that class again, so that references match the instance they reference."""
    for element in ds:
        if element.VR != "SQ":
            continue
        for item in element.value:
            instance = str(item.get("ReferencedSOPInstanceUID", ""))
            if instance in classes and "ReferencedSOPClassUID" in item:
                item.ReferencedSOPClassUID = classes[instance]
            restore_classes(item, classes)


def legacy_multi_frame(source: Dataset) -> bool:
    """A multi-frame class without functional groups (NM, US, XA multi-frame): highdicom reads
    the geometry of multi-frame sources from functional groups, so SEG and GSPS skip these."""
    return _uid_text(source.get("SOPClassUID", "")) in MULTI_FRAME_CLASSES \
        and "SharedFunctionalGroupsSequence" not in source

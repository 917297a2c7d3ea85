"""A patient's identity as instance headers give it: what every instance of one job must share.

Broken anonymisers and test systems reuse Study and Series Instance UIDs across patients, so a
(study, series) key alone does not prove that its instances are one patient's. The values are
compared, never logged or audited: callers learn only which attributes disagree.
"""

from collections.abc import Iterable

from pydicom import Dataset

#: The attributes that together identify the patient (PS3.3 C.7.1.1 Patient Module).
IDENTITY_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate")


def normalised(value: object) -> str:
    """A header value as compared: padding spaces and empty trailing Person Name components or
    groups carry no meaning (``"DOE^JOHN^^"`` is ``"DOE^JOHN"``); case does (a reader cannot
    tell a typing variant from another patient, so the comparison stays strict)."""
    groups = ["^".join(part.strip() for part in group.split("^")).rstrip("^")
              for group in str(value if value is not None else "").split("=")]
    return "=".join(groups).rstrip("=").strip()


def patient_identity(ds: Dataset) -> tuple[str, ...]:
    """The normalised values of :data:`IDENTITY_KEYWORDS` in ``ds``; '' where one is absent."""
    return tuple(normalised(ds.get(keyword, "")) for keyword in IDENTITY_KEYWORDS)


def differing_identity(datasets: Iterable[Dataset]) -> list[str]:
    """The identity attributes on which ``datasets`` disagree, by keyword; empty when they are
    one patient's.

    Only present values count: an instance without Patient Birth Date does not differ from one
    with it, but two different present values always do (any of the four).
    """
    seen: list[set[str]] = [set() for _ in IDENTITY_KEYWORDS]
    for ds in datasets:
        for values, value in zip(seen, patient_identity(ds), strict=True):
            if value:
                values.add(value)
    return [keyword for keyword, values in zip(IDENTITY_KEYWORDS, seen, strict=True) if len(values) > 1]

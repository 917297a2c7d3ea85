"""DIMSE status codes and A-ASSOCIATE-RJ reasons the SCP answers with (PS3.4 B.2.3, PS3.8 9.3.4).

Codes in the ranges the standard leaves to the implementation (0xA7xx, 0xCxxx) are documented
in docs/conformance.md.
"""

from enum import IntEnum

ERROR_COMMENT_MAX = 64  # Error Comment (0000,0902) is LO


def error_comment(text: str) -> str:
    """``text`` made a valid Error Comment: printable ASCII without backslash, at most 64 characters.

    A backslash would split the LO into several values; other characters may not be in the
    peer's character repertoire.
    """
    return "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)[:ERROR_COMMENT_MAX]


class StoreStatus(IntEnum):
    """C-STORE response statuses."""

    SUCCESS = 0x0000
    NOT_AUTHORIZED = 0x0124  # the calling AE may query, not store (node.allowed_peers)
    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # STOW-RS: a part of a class C-STORE would not negotiate
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_INSTANCE_TOO_LARGE = 0xA701
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    CANNOT_UNDERSTAND_INVALID_UID = 0xC001
    CANNOT_UNDERSTAND_UID_MISMATCH = 0xC002
    CANNOT_UNDERSTAND_STUDY_MISMATCH = 0xC003  # STOW-RS POST /studies/{study}: another study's instance
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # STOW-RS: a part in a syntax C-STORE would not negotiate


class EchoStatus(IntEnum):
    """C-ECHO response statuses."""

    SUCCESS = 0x0000


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ Result."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ Source."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag., for the sources the node uses."""

    NO_REASON_GIVEN = 0x01  # service user
    CALLING_AE_TITLE_NOT_RECOGNIZED = 0x03  # service user
    CALLED_AE_TITLE_NOT_RECOGNIZED = 0x07  # service user
    LOCAL_LIMIT_EXCEEDED = 0x02  # service provider (presentation)

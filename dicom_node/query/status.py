"""C-FIND, C-GET and C-MOVE response statuses the Q/R SCP answers with (PS3.4 C.4.1.1.4,
C.4.2.1.5, C.4.3.1.4); documented in docs/conformance.md."""

from enum import IntEnum


class QueryStatus(IntEnum):
    """Q/R response statuses (the sub-operation warning and the counts come from pynetdicom)."""

    SUCCESS = 0x0000
    NOT_AUTHORIZED = 0x0124  # the calling AE may store, not query or retrieve (PS3.7 C.5.x)
    OUT_OF_RESOURCES = 0xA700
    MOVE_DESTINATION_UNKNOWN = 0xA801
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    SUB_OPERATIONS_WARNING = 0xB000  # some sub-operations failed (pynetdicom sets it)
    UNABLE_TO_PROCESS = 0xC000
    CANCEL = 0xFE00
    PENDING = 0xFF00

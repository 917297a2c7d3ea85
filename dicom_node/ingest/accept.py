"""Accepting one received instance, whatever carried it: the one path C-STORE
(:mod:`dicom_node.ingest.scp`) and STOW-RS (:mod:`dicom_node.dicomweb.stow`) both take.

:func:`accept` bounds the size, stamps the node's File Meta Information, stages the data set
(:meth:`~dicom_node.store.InstanceStore.stage`: every element header walked, written and flushed),
audits group 0002 elements left out of it, checks the data set against what the transport said it
carries, commits it (renamed into place and indexed) and audits ``instance_stored``. Every other
outcome is a named :class:`~dicom_node.ingest.status.StoreStatus` with a reason, and nothing
half-written stays. The transport only turns the :class:`Outcome` into its own answer: a C-STORE
response status, or an item of a PS3.18 store response.
"""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.dataset import FileMetaDataset

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.audit import Audit
from dicom_node.ingest.status import StoreStatus
from dicom_node.store import (
    InstanceRecord,
    InstanceStore,
    InvalidInstanceError,
    OutOfSpaceError,
    StagedInstance,
    StorageError,
)

logger = logging.getLogger(__name__)

#: ``note(level, msg, *args)``: where lines about one peer's instances go (its rate limit, if any).
Note = Callable[..., object]


@dataclass(frozen=True)
class Offer:
    """One instance a peer offers, as its transport delivered it.

    Attributes
    ----------
    file_meta
        File Meta Information with the data set's Transfer Syntax UID; :func:`accept` stamps the
        node's implementation and ``calling`` as Source AE Title into it.
    dataset
        A seekable binary file holding the data set (no preamble, no group 0002) from ``start``
        to its end.
    calling
        Who sent it: the calling AE title (C-STORE) or the STOW-RS label; recorded as the
        instance's calling AE title and Source AE Title.
    sop_class_uid, sop_instance_uid
        What the transport says the data set is (C-STORE: the Affected SOP Class and Instance
        UIDs; STOW-RS: the part's Media Storage SOP Class and Instance UIDs); the data set must
        agree.
    start
        Offset of the data set in ``dataset``.
    study_instance_uid
        The study the request is restricted to (STOW-RS ``POST /studies/{study}``), or None.
    declared_as
        Where ``sop_class_uid`` and ``sop_instance_uid`` come from, for the refusal's reason:
        "Affected" (the C-STORE request) or "Media Storage" (a Part 10 file's meta).
    """

    file_meta: FileMetaDataset
    dataset: BinaryIO
    calling: str
    sop_class_uid: object
    sop_instance_uid: object
    start: int = 0
    study_instance_uid: str | None = None
    declared_as: str = "Affected"


@dataclass(frozen=True)
class Outcome:
    """What became of an :class:`Offer`: stored (``record``) or refused with a status and reason."""

    status: StoreStatus
    comment: str = ""
    record: InstanceRecord | None = None
    #: The UIDs as far as they are known (from the data set once staged, else from the offer).
    sop_class_uid: str = ""
    sop_instance_uid: str = ""

    @property
    def stored(self) -> bool:
        return self.status == StoreStatus.SUCCESS


def accept(offer: Offer, store: InstanceStore, max_instance_size: int, audit: Audit,
           note: Note = logger.log) -> Outcome:
    """Store one offered instance durably and index it, or refuse it with a status and reason.

    Success is returned only once the instance is on disk, flushed and indexed; on any refusal
    the temporary file is removed. Never raises for what a peer sent (a store error is a status).
    """
    sop_uid = str(offer.sop_instance_uid or "")
    size = offer.dataset.seek(0, os.SEEK_END) - offer.start
    if size > max_instance_size:  # the transport refuses earlier; this is the backstop
        note(logging.WARNING, "refused %s from %s: %d bytes over limit", sop_uid[:64], offer.calling, size)
        return _refused(offer, StoreStatus.OUT_OF_RESOURCES_INSTANCE_TOO_LARGE,
                        f"instance of {size} bytes exceeds limit {max_instance_size}")
    meta = offer.file_meta
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = offer.calling
    try:
        staged = store.stage(meta, offer.dataset, max_inflated_size=max_instance_size, start=offer.start)
    except InvalidInstanceError as exc:
        note(logging.WARNING, "refused %r from %s: %s", sop_uid[:64], offer.calling, exc)
        status = (StoreStatus.CANNOT_UNDERSTAND_INVALID_UID if exc.kind == "uid"
                  else StoreStatus.CANNOT_UNDERSTAND)
        return _refused(offer, status, str(exc))
    except StorageError as exc:
        return _storage_failure(offer, exc, sop_uid, note)
    if staged.stripped_tags:
        note(logging.WARNING, "left out %d group 0002 element(s) found in the data set of %s from %s",
             len(staged.stripped_tags), staged.header.sop_instance_uid, offer.calling)
        audit.record("file_meta_stripped", study_instance_uid=staged.header.study_instance_uid,
                     sop_instance_uid=staged.header.sop_instance_uid, calling_ae_title=offer.calling,
                     tags=list(staged.stripped_tags))
    return _commit(offer, store, staged, audit, note)


def _refused(offer: Offer, status: StoreStatus, comment: str,
             staged: StagedInstance | None = None) -> Outcome:
    if staged is not None:
        return Outcome(status, comment, sop_class_uid=staged.header.sop_class_uid,
                       sop_instance_uid=staged.header.sop_instance_uid)
    return Outcome(status, comment, sop_class_uid=str(offer.sop_class_uid or ""),
                   sop_instance_uid=str(offer.sop_instance_uid or ""))


def _storage_failure(offer: Offer, exc: StorageError, sop_uid: str, note: Note,
                     staged: StagedInstance | None = None) -> Outcome:
    """0xA700 for a full disk (or the free-space floor), 0x0110 for any other storage error."""
    note(logging.ERROR, "refused %s from %s: %s", sop_uid[:64], offer.calling, exc)
    if isinstance(exc, OutOfSpaceError):
        return _refused(offer, StoreStatus.OUT_OF_RESOURCES, f"out of resources: {exc}", staged)
    return _refused(offer, StoreStatus.PROCESSING_FAILURE, str(exc), staged)


def mismatch(staged: StagedInstance, offer: Offer) -> tuple[StoreStatus, str] | None:
    """Why the staged data set is not what the offer said it is, or None if it is."""
    header = staged.header
    if header.sop_class_uid != offer.sop_class_uid:
        return (StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOPClassUID differs from {offer.declared_as} SOP Class UID")
    if header.sop_instance_uid != offer.sop_instance_uid:
        return (StoreStatus.CANNOT_UNDERSTAND_UID_MISMATCH,
                f"SOPInstanceUID differs from {offer.declared_as} SOP Instance UID")
    if offer.study_instance_uid is not None and header.study_instance_uid != offer.study_instance_uid:
        return (StoreStatus.CANNOT_UNDERSTAND_STUDY_MISMATCH,
                "StudyInstanceUID differs from the study in the request")
    return None


def _commit(offer: Offer, store: InstanceStore, staged: StagedInstance, audit: Audit,
            note: Note) -> Outcome:
    committed = False
    try:
        refusal = mismatch(staged, offer)
        if refusal is not None:
            note(logging.WARNING, "refused %s from %s: %s", staged.header.sop_instance_uid, offer.calling,
                 refusal[1])
            return _refused(offer, *refusal, staged)
        record = store.commit(staged, offer.calling)
        committed = True
    except StorageError as exc:
        return _storage_failure(offer, exc, staged.header.sop_instance_uid, note, staged)
    finally:
        if not committed:
            store.discard(staged)
    logger.debug("stored %s (series %s) from %s", record.sop_instance_uid, record.series_instance_uid,
                 offer.calling)
    audit.record("instance_stored", study_instance_uid=record.study_instance_uid,
                 series_instance_uid=record.series_instance_uid, sop_instance_uid=record.sop_instance_uid,
                 sop_class_uid=record.sop_class_uid, calling_ae_title=offer.calling,
                 size_bytes=record.size_bytes)
    return Outcome(StoreStatus.SUCCESS, record=record, sop_class_uid=record.sop_class_uid,
                   sop_instance_uid=record.sop_instance_uid)

"""Roles in the allow-list: ``allowed_peers`` stores, ``query_peers`` queries and retrieves; a
peer with neither is rejected at association; today's configurations keep storing only."""

import dataclasses
from typing import Any

from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
)

from dicom_node.config import Settings
from dicom_node.ingest.policy import AssociationPolicy
from dicom_node.ingest.scp import start_ingest
from dicom_node.ingest.status import RejectReason
from dicom_node.store import InstanceStore
from tests.factories import ct_dataset


def test_the_store_and_query_roles_are_separate_and_default_to_storing_only() -> None:
    today = AssociationPolicy(ae_title="XAI_NODE", allowed_peers=("CT1", "PACS@10.0.0.5"))
    assert today.may_store("CT1", "10.0.0.9") and not today.may_query("CT1", "10.0.0.9")
    assert today.check("XAI_NODE", "PACS", "10.0.0.6", 0) is not None  # wrong address, as before
    roles = AssociationPolicy(ae_title="XAI_NODE", allowed_peers=("CT1",), query_peers=("VIEWER@10.0.0.7", "PACS"))
    assert roles.check("XAI_NODE", "VIEWER", "10.0.0.7", 0) is None  # admitted to query only
    assert roles.may_query("VIEWER", "10.0.0.7") and not roles.may_store("VIEWER", "10.0.0.7")
    assert not roles.may_query("VIEWER", "10.0.0.8")
    rejected = roles.check("XAI_NODE", "STRANGER", "10.0.0.7", 0)
    assert rejected is not None and rejected.reason is RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED
    assert "query_peers" in rejected.description
    anyone = AssociationPolicy(ae_title="XAI_NODE", query_peers=("*",))
    assert anyone.may_query("WHOEVER", "10.1.1.1") and anyone.may_store("WHOEVER", "10.1.1.1")
    assert not AssociationPolicy(ae_title="XAI_NODE").may_query("WHOEVER", "10.1.1.1")


def test_a_query_wildcard_never_widens_admission() -> None:
    """``query_peers = ["*"]`` means every peer ``allowed_peers`` admits, not every peer."""
    listed = AssociationPolicy(ae_title="XAI_NODE", allowed_peers=("CT1",), query_peers=("*",))
    assert listed.may_query("CT1", "10.0.0.9")
    assert not listed.may_query("STRANGER", "10.0.0.9")
    rejected = listed.check("XAI_NODE", "STRANGER", "10.0.0.9", 0)
    assert rejected is not None and rejected.reason is RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED
    mixed = AssociationPolicy(ae_title="XAI_NODE", allowed_peers=("CT1@10.0.0.5",), query_peers=("*", "VIEWER"))
    assert not mixed.may_query("CT1", "10.0.0.6") and mixed.check("XAI_NODE", "CT1", "10.0.0.6", 0) is not None
    assert mixed.may_query("VIEWER", "10.0.0.6") and not mixed.may_store("VIEWER", "10.0.0.6")


def test_roles_over_real_associations(settings: Settings) -> None:
    """A query-only peer cannot store (0x0124); a store-only peer cannot query (0x0124); a peer
    with neither role is rejected."""
    settings = dataclasses.replace(settings, node=dataclasses.replace(
        settings.node, allowed_peers=("MODALITY",), query_peers=("VIEWER",)))
    store = InstanceStore(settings.node.data_dir)
    server = start_ingest(settings, store)
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ""

    def associate(calling: str) -> Any:
        ae = AE(ae_title=calling)
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        return ae.associate("127.0.0.1", server.port, ae_title="XAI_NODE")

    try:
        modality, viewer = associate("MODALITY"), associate("VIEWER")
        assert modality.send_c_store(ct_dataset()).Status == 0x0000
        assert viewer.send_c_store(ct_dataset()).Status == 0x0124
        [(status, _)] = list(modality.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        assert status.Status == 0x0124
        answers = [s.Status for s, _ in viewer.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
        assert answers == [0xFF00, 0x0000]  # the one study MODALITY stored
        modality.release()
        viewer.release()
        assert associate("STRANGER").is_rejected
        assert store.index.counts()[2] == 1
    finally:
        server.stop(1.0)
        store.close()

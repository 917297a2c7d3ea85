"""Roles in the allow-list: ``allowed_peers`` stores, ``query_peers`` queries and retrieves; a
peer with neither is rejected at association; today's configurations keep storing only."""

from dicom_node.ingest.policy import AssociationPolicy
from dicom_node.ingest.status import RejectReason


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

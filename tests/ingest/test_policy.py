"""The association policy as a pure function: who may associate, and the A-ASSOCIATE-RJ fields."""

from dicom_node.ingest.policy import AssociationPolicy
from dicom_node.ingest.status import RejectReason, RejectResult, RejectSource

POLICY = AssociationPolicy("XAI_NODE", ("CT01", "PACS@10.0.0.5"), max_associations=2)


def test_accepts_known_peers() -> None:
    assert POLICY.check("XAI_NODE", "CT01", "192.168.1.1", 0) is None
    assert POLICY.check("XAI_NODE  ", "PACS", "10.0.0.5", 1) is None  # AE titles are space padded


def test_called_ae_title_must_match() -> None:
    rejection = POLICY.check("OTHER", "CT01", "10.0.0.1", 0)
    assert rejection is not None
    assert (rejection.result, rejection.source, rejection.reason) == (
        RejectResult.PERMANENT, RejectSource.SERVICE_USER, RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED)


def test_calling_ae_title_and_host_must_be_allowed() -> None:
    for calling, address in (("INTRUDER", "10.0.0.5"), ("PACS", "10.0.0.6")):
        rejection = POLICY.check("XAI_NODE", calling, address, 0)
        assert rejection is not None
        assert rejection.reason == RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED
        assert calling in rejection.description


def test_empty_allow_list_accepts_anyone() -> None:
    assert AssociationPolicy("XAI_NODE").check("XAI_NODE", "ANYONE", "1.2.3.4", 0) is None


def test_association_cap_is_transient() -> None:
    rejection = POLICY.check("XAI_NODE", "CT01", "10.0.0.1", 2)
    assert rejection is not None
    assert (rejection.result, rejection.source, rejection.reason) == (
        RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION,
        RejectReason.LOCAL_LIMIT_EXCEEDED)

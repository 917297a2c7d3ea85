"""Routing: each match key, several pipelines, no match with its reason, own outputs ignored."""

import pytest

from dicom_node import MANUFACTURER
from dicom_node.config import Pipeline
from dicom_node.jobs.routing import SeriesFacts, route

CR = SeriesFacts(modality="CR", body_part_examined="CHEST", series_description="PA Chest",
                 calling_ae_title="XRAY1", manufacturer="Acme",
                 sop_class_uids=frozenset({"1.2.840.10008.5.1.4.1.1.1"}))


def pipeline(name: str, **match) -> Pipeline:
    return Pipeline(name=name, model="demo", match={k: tuple(v) for k, v in match.items()})


@pytest.mark.parametrize(
    ("key", "hit", "miss"),
    [
        ("modality", ["DX", "cr"], ["CT"]),
        ("body_part_examined", ["chest"], ["ABDOMEN"]),
        ("sop_class_uid", ["1.2.840.10008.5.1.4.1.1.1", "1.2.3"], ["1.2.840.10008.5.1.4.1.1.2"]),
        ("calling_ae_title", ["XRAY1"], ["XRAY2"]),
        ("series_description", ["*chest*"], ["*LAT*"]),
    ],
)
def test_each_match_key(key: str, hit: list[str], miss: list[str]) -> None:
    assert route(CR, [pipeline("p", **{key: hit})]).pipelines[0].name == "p"
    decision = route(CR, [pipeline("p", **{key: miss})])
    assert decision.pipelines == ()
    assert decision.reason.startswith("no pipeline matches: p: ")


def test_all_keys_must_match() -> None:
    assert route(CR, [pipeline("p", modality=["CR"], body_part_examined=["KNEE"])]).pipelines == ()


def test_a_series_may_go_to_several_pipelines_in_config_order() -> None:
    pipelines = [pipeline("chest", modality=["CR"]), pipeline("ct", modality=["CT"]),
                 pipeline("everything")]
    assert [p.name for p in route(CR, pipelines).pipelines] == ["chest", "everything"]


def test_no_match_says_why_for_each_pipeline() -> None:
    decision = route(CR, [pipeline("ct", modality=["CT"]), pipeline("mr", modality=["MR"])])
    assert "ct: modality 'CR' not in ['CT']" in decision.reason
    assert "mr: modality 'CR' not in ['MR']" in decision.reason
    assert route(CR, []).reason == "no pipelines are configured"


def test_the_nodes_own_outputs_are_never_routed() -> None:
    own = SeriesFacts(**{**CR.__dict__, "manufacturer": MANUFACTURER})
    decision = route(own, [pipeline("everything")])
    assert decision.pipelines == () and "created by this node" in decision.reason

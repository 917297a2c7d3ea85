"""Output UIDs derive from the source's study AND series: two studies that share a Series
Instance UID never get the same output Series, SOP Instance or Tracking UID; sources of several
studies or series are never encoded into one result."""

import copy

import pytest
from pydicom import Dataset

from dicom_node.encode import Producer, encode_results, not_analysed_report
from tests.encode.conftest import make_case
from tests.factories import new_uid


def derived(datasets: list, source: Dataset, producer: Producer) -> set[str]:
    """The UIDs the node made for ``datasets``: every UID in them but the standard's (SOP classes),
    the source's (references, Frame of Reference) and the node's own device UID."""
    given = {str(e.value) for e in source.iterall() if e.VR == "UI"} | {str(producer.device_uid)}
    found = {str(e.value) for ds in datasets for e in ds.iterall() if e.VR == "UI"}
    return {uid for uid in found if uid.startswith("2.25.")} - given


def test_two_studies_sharing_a_series_uid_get_different_output_uids(producer: Producer) -> None:
    case = make_case("CT", producer)
    outputs = ("sc", "sr", "seg", "pm", "gsps")
    first = encode_results([case.source], case.predictions, case.heatmaps, producer, outputs, ("gradcam",))
    other = copy.deepcopy(case.source)
    other.StudyInstanceUID = new_uid()  # the same Series (and SOP) Instance UIDs, another study
    second = encode_results([other], case.predictions, case.heatmaps, producer, outputs, ("gradcam",))
    assert sorted(ds.Modality for ds in first) == sorted(ds.Modality for ds in second)
    assert all(ds.StudyInstanceUID == other.StudyInstanceUID for ds in second)
    made = derived(first, case.source, producer)
    assert {str(ds.SOPInstanceUID) for ds in first} | {str(ds.SeriesInstanceUID) for ds in first} <= made
    assert any(e.keyword in ("UID", "TrackingUID") and str(e.value) in made for ds in first for e in ds.iterall())
    assert not made & derived(second, other, producer)
    report_a = not_analysed_report([case.source], "why", producer)
    report_b = not_analysed_report([other], "why", producer)
    assert not derived([report_a], case.source, producer) & derived([report_b], other, producer)


def test_sources_of_two_studies_are_never_encoded_together(producer: Producer) -> None:
    case = make_case("CR", producer)
    other = copy.deepcopy(case.source)
    other.StudyInstanceUID, other.SOPInstanceUID = new_uid(), new_uid()
    with pytest.raises(ValueError, match=r"2 \(study, series\) pairs"):
        encode_results([case.source, other], case.predictions, case.heatmaps, producer, ("sr",))
    with pytest.raises(ValueError, match=r"2 \(study, series\) pairs"):
        not_analysed_report([case.source, other], "why", producer)

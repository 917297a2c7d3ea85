"""Every object the node writes names the node and the model in its Contributing Equipment
Sequence (0018,A001); dciodvfy and dcmqi checks run in test_objects,
test_header and test_dcmqi on the same objects."""

from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset, dcmread

from dicom_node import MANUFACTURER, __version__
from dicom_node.encode import Producer, encode_results, minimal_report, not_analysed
from dicom_node.encode.common import contributing_equipment, mark_equipment
from tests.encode.conftest import KINDS, make_case

ALL = ("sc", "sr", "seg", "pm", "gsps")


def objects_of(kind: str, producer: Producer) -> list[Dataset]:
    case = make_case(kind, producer, methods=("gradcam", "lime"))
    source = case.source
    study, series = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
    return [*encode_results([source], case.predictions, case.heatmaps, producer, ALL, ["gradcam", "lime"]),
            not_analysed([source], "test reason", producer, study, series),
            minimal_report(study, series, "test reason", producer, [source])]


def ours(ds: Dataset) -> list[Dataset]:
    return [item for item in ds.ContributingEquipmentSequence if item.Manufacturer == MANUFACTURER]


@pytest.mark.parametrize("kind", KINDS)
def test_every_output_names_the_node_and_the_model(tmp_path: Path, producer: Producer, kind: str) -> None:
    before = datetime.now() - timedelta(seconds=1)
    objects = objects_of(kind, producer)
    classes = {ds.SOPClassUID.name for ds in objects}
    assert len(classes) >= 5, classes  # SC, SR, SEG, GSPS (and PM where there is a frame of reference),
    for ds in objects:                  # the "not analysed" SR, the minimal Basic Text SR
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with pydicom.config.strict_reading():
            written = dcmread(path)
        [item] = ours(written)
        name = written.SOPClassUID.name
        [purpose] = item.PurposeOfReferenceCodeSequence
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == \
            ("109102", "DCM", "Processing Equipment"), name
        assert item.StationName == "XAI_NODE" and item.InstitutionName == "St Elsewhere Hospital", name
        assert item.ManufacturerModelName == f"demo-cxr {producer.manifest.version}", name
        assert list(item.SoftwareVersions) == [f"dicom-node {__version__}",
                                               f"demo-cxr {producer.manifest.version}"], name
        assert item.DeviceUID == producer.device_uid, name
        assert producer.manifest.sha256[:16] in item.ContributionDescription, name
        assert "UNVERIFIED" in item.ContributionDescription, name
        when = datetime.strptime(str(item.ContributionDateTime)[:14], "%Y%m%d%H%M%S")
        assert before - timedelta(seconds=1) <= when <= datetime.now(), name
        # the output's own equipment says the same
        assert written.Manufacturer == MANUFACTURER and written.StationName == "XAI_NODE", name
        assert written.InstitutionName == "St Elsewhere Hospital", name


def test_highdicoms_items_are_kept_and_ours_is_not_repeated(producer: Producer) -> None:
    case = make_case("CT", producer)
    [overlay] = [ds for ds in encode_results([case.source], case.predictions, case.heatmaps, producer, ["sc", "sr"],
                                             ["gradcam"]) if ds.Modality != "SR"][:1]
    makers = [item.Manufacturer for item in overlay.ContributingEquipmentSequence]
    assert makers[-1] == MANUFACTURER and makers.count(MANUFACTURER) == 1
    assert "Highdicom open-source contributors" in makers  # highdicom's own item stays
    mark_equipment(overlay, producer)
    assert [item.Manufacturer for item in overlay.ContributingEquipmentSequence] == makers


def test_without_an_institution_the_item_has_none(producer: Producer) -> None:
    from dataclasses import replace

    item = contributing_equipment(replace(producer, institution=""), datetime(2026, 1, 2, 3, 4, 5))
    assert "InstitutionName" not in item and str(item.ContributionDateTime) == "20260102030405"


def test_an_item_naming_another_dicom_node_stays(producer: Producer) -> None:
    """A source made by a dicom-node (another site's, or an earlier model's) keeps the item that
    names it: only this node's and model's own item is replaced."""
    from dataclasses import replace

    case = make_case("CT", producer)
    case.source.Manufacturer = MANUFACTURER  # highdicom adds the source's equipment to SR, SEG, PM
    [overlay] = [ds for ds in encode_results([case.source], case.predictions, case.heatmaps, producer, ["sr", "seg"],
                                             ["gradcam"]) if ds.Modality == "SEG"]
    makers = [item.Manufacturer for item in overlay.ContributingEquipmentSequence]
    assert makers.count(MANUFACTURER) == 2, makers  # the source's, then ours
    assert overlay.ContributingEquipmentSequence[-1].DeviceUID == producer.device_uid
    elsewhere = replace(producer, station="OTHER_NODE")  # another installation's item on the same object
    mark_equipment(overlay, elsewhere)
    mark_equipment(overlay, producer)
    items = [(item.Manufacturer, item.get("DeviceUID")) for item in overlay.ContributingEquipmentSequence]
    assert items[-2:] == [(MANUFACTURER, elsewhere.device_uid), (MANUFACTURER, producer.device_uid)], items
    assert len(items) == len(makers) + 1, items  # ours replaced, not repeated

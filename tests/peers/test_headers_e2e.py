"""Real-world headers through a real PACS: Orthanc sends a CR with zero Pixel Spacing, no Patient
ID and de-identified without a method, a CT with an empty Slice Thickness, and a palette colour
ultrasound image in the retired US Image Storage class; the node stores all three and every object
it sends back passes dciodvfy."""

from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import require_tool
from tests.encode.conftest import dciodvfy_errors
from tests.encode.oddities import ODDITIES, US_RETIRED, radiograph, set_attributes
from tests.factories import new_uid
from tests.jobs.test_crash import wait_for
from tests.peers.test_orthanc_e2e import node_rows, orthanc_program, results_in, setup  # noqa: F401

pytestmark = pytest.mark.peers


def test_odd_headers_from_orthanc_come_back_valid(tmp_path: Path, setup: tuple) -> None:  # noqa: F811
    pacs, node = setup
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    # rendered at 128 px, where the demo model sees the nodule (at 64 px it is a pixel or two, which
    # model 3.0.0 rightly misses): a positive finding, so an overlay comes back too
    cr = set_attributes(PixelSpacing=["0", "0"], ImagerPixelSpacing=["0", "0"])(radiograph(size=128))
    del cr.PatientID
    cr.PatientIdentityRemoved = "YES"
    ct = ODDITIES["empty-slice-thickness"]()
    us = ODDITIES["palette-retired-us"]()
    us.SeriesInstanceUID, us.SOPInstanceUID = new_uid(), new_uid()  # the CR's phantom otherwise
    us.file_meta.MediaStorageSOPInstanceUID = us.SOPInstanceUID
    paths = []
    for name, ds in (("cr", cr), ("ct", ct), ("us", us)):
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        paths.append(tmp_path / f"{name}.dcm")
    uploaded = [pacs.upload(p) for p in paths]
    studies = sorted({u["ParentStudy"] for u in uploaded})
    job = pacs.post("/modalities/node/store", {"Resources": studies, "Synchronous": True})
    assert job.get("FailedInstancesCount", 0) == 0  # the retired class too: no "no presentation context"
    stored = {uid for (uid,) in node_rows(node, "SELECT sop_instance_uid FROM instances")}
    assert {str(cr.SOPInstanceUID), str(ct.SOPInstanceUID), str(us.SOPInstanceUID)} <= stored
    assert (US_RETIRED,) in node_rows(node, "SELECT sop_class_uid FROM instances")

    def arrived() -> bool:
        done = node_rows(node, "SELECT id FROM jobs WHERE state IN ('done', 'failed')")
        reports = [i for uid in (cr.StudyInstanceUID, ct.StudyInstanceUID) for i in results_in(pacs, str(uid))
                   if pacs.get(f"/instances/{i['ID']}/simplified-tags")["Modality"] == "SR"]
        return len(done) == 2 and len(reports) >= 2
    wait_for(arrived, timeout=240, what="a report per routed series in Orthanc")

    back = results_in(pacs, str(cr.StudyInstanceUID)) + results_in(pacs, str(ct.StudyInstanceUID))
    assert any(pacs.get(f"/instances/{i['ID']}/simplified-tags")["Modality"] == "OT" for i in back)
    de_identified = []
    for instance in back:
        path = tmp_path / f"{instance['ID']}.dcm"
        path.write_bytes(pacs.get(f"/instances/{instance['ID']}/file", raw=True))
        errors, output = dciodvfy_errors(dciodvfy, path)
        assert not errors, output
        ds = dcmread(path)
        assert "PixelSpacing" not in ds or all(float(v) > 0 for v in ds.PixelSpacing)
        if ds.StudyInstanceUID == cr.StudyInstanceUID:
            assert ds.PatientID == ""
        if ds.get("PatientIdentityRemoved") == "YES":  # copied by highdicom's SR and SEG, not the SC
            assert ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence")
            de_identified.append(ds.Modality)
    assert "SR" in de_identified  # the CR's report says the data were de-identified, and is valid

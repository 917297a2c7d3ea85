"""``dicom-node explain`` on every header oddity: each series analysed, or reported "not analysed";
every file written passes dciodvfy."""

import dataclasses
import io
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node import offline
from dicom_node import pipeline as pipeline_steps
from dicom_node.config import InferenceSettings, ModelsSettings, Pipeline
from dicom_node.offline import explain_files
from tests.conftest import make_settings, require_tool
from tests.encode.conftest import dciodvfy_errors
from tests.encode.oddities import ODDITIES
from tests.factories import new_uid
from tests.inference.models import write_model
from tests.test_pipeline_headers import quick_explain


@pytest.mark.peers
def test_explain_gives_every_oddity_results_that_pass_dciodvfy(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    steps = tuple(quick_explain if step is pipeline_steps.explain else step for step in offline.OFFLINE_STEPS)
    monkeypatch.setattr(offline, "OFFLINE_STEPS", steps)
    manifest = write_model(tmp_path / "models", "tiny")
    manifest.write_text(manifest.read_text().replace('modalities = ["CR", "DX"]', "modalities = []"))
    inputs = tmp_path / "in"
    inputs.mkdir()
    series = {}
    for name, make in ODDITIES.items():
        ds = make()  # the phantoms share UIDs: one series each here
        ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(inputs / f"{name}.dcm", enforce_file_format=True)
        series[str(ds.SeriesInstanceUID)] = name
    pipeline = Pipeline(name="all", model="tiny", explain=("gradcam",), explain_labels="all",
                        outputs=("sc", "sr", "seg", "pm", "gsps"))
    settings = dataclasses.replace(make_settings(tmp_path / "data"), pipelines=(pipeline,),
                                   models=ModelsSettings(dir=tmp_path / "models"),
                                   inference=InferenceSettings(device="cpu"))
    out = io.StringIO()
    assert explain_files(settings, [inputs], tmp_path / "out", None, out) == 0, out.getvalue()
    rows = [line for line in out.getvalue().splitlines() if " all " in line]
    assert len(rows) == len(ODDITIES) and all("  analysed: " in row for row in rows), out.getvalue()
    written = sorted((tmp_path / "out").rglob("*.dcm"))
    reported = {str(item.SeriesInstanceUID) for ds in map(dcmread, written) if ds.Modality == "SR"
                for study in ds.CurrentRequestedProcedureEvidenceSequence for item in study.ReferencedSeriesSequence}
    assert set(series) <= reported  # an SR for every series
    for path in written:
        errors, output = dciodvfy_errors(dciodvfy, path)
        assert not errors, f"{path.name}: {output}"

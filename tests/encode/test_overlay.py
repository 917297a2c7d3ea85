"""The overlay of a real explanation: the demo model's Grad-CAM of a phantom with a known lesion."""

from pathlib import Path

import numpy as np
import torch

from dicom_node.encode import Producer, hot_region, secondary_capture, source_display
from dicom_node.encode.overlay import CONTOUR
from dicom_node.explain.heatmap import explain_frame
from dicom_node.inference import InferenceRunner, ModelRegistry, preprocess
from dicom_node.phantoms import render, to_dataset

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_overlay_hot_region_lies_on_the_lesion_in_the_native_grid() -> None:
    torch.manual_seed(0)
    runner = InferenceRunner(ModelRegistry(MODELS), device="cpu")
    loaded = runner.model("demo-cxr")
    phantom = render(7_000_003, 640, findings={"consolidation": True})
    source = to_dataset(phantom, modality="CR", photometric="MONOCHROME1")
    [item] = preprocess(source, loaded.manifest.input)
    [prediction] = runner.predict("demo-cxr", [item])
    assert "consolidation" in prediction.positives
    [heatmap] = explain_frame(loaded, item, prediction, ["consolidation"], ["gradcam"], seed=1, quality_steps=4)
    lesion = phantom.masks["consolidation"]
    region = hot_region(heatmap.native_map)
    assert region is not None
    column, row = (int(v) for v in region.peak)
    assert lesion[row, column], "the map's maximum is off the lesion"
    assert (region.mask & lesion).sum() / region.mask.sum() > 0.5

    overlay = secondary_capture(source, heatmap, Producer("chest", loaded.manifest, "XAI_NODE"), 1)
    pixels = overlay.pixel_array
    assert pixels.shape == (source.Rows, source.Columns, 3)
    drawn = np.all(pixels == CONTOUR, axis=-1)
    rows, columns = np.nonzero(drawn)
    assert len(rows) > 20
    centre = int(np.median(rows)), int(np.median(columns))
    near = lesion[max(0, centre[0] - 40):centre[0] + 40, max(0, centre[1] - 40):centre[1] + 40]
    assert near.any(), "the drawn contour is not around the lesion"
    # where the map is not positive, away from the banner and legend, the viewer sees the source as
    # its own viewer would (MONOCHROME1 inverted); only the contour's line crosses some of it
    display = source_display(source, 0)
    cold = heatmap.native_map <= 0
    cold[: source.Rows // 8] = False
    cold[source.Rows // 2:, source.Columns // 2:] = False  # the legend
    assert np.mean(np.all(pixels[cold] == display[cold], axis=-1)) > 0.99

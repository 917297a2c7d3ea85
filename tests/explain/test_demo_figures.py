"""The demo model's explanation figures, as reported in its card, recomputed on a few held-out
phantoms through the pipeline's own code (no training here)."""

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dicom_node.explain.quality import randomised_copy
from dicom_node.explain.sanity import cached_result
from dicom_node.inference import InferenceRunner, ModelRegistry

REPO = Path(__file__).resolve().parents[2]
CARD = REPO / "models" / "demo-cxr"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evaluate_explanations", CARD / "evaluate_explanations.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("label", ["nodule", "consolidation"])
def test_grad_cam_verdicts_of_the_focal_findings_are_as_reported(label: str) -> None:
    """The first two held-out phantoms of each focal finding get the verdicts the card's
    explanations.json records for them, and the reported rate is the mean of those verdicts."""
    script = _script()
    written = json.loads((CARD / "explanations.json").read_text())
    reported, first_seed = written["figures"][label]["gradcam"], written["first_seed"]
    per_image = reported["faithful_per_image"]
    assert reported["faithful"] == pytest.approx(sum(per_image) / len(per_image), abs=1e-3)
    runner = InferenceRunner(ModelRegistry(REPO / "models"), "cpu")
    loaded = runner.model("demo-cxr")
    result = cached_result(loaded.manifest)
    assert result is not None and result.passed
    randomised = randomised_copy(loaded.module, 0)
    torch.set_num_threads(2)
    k = script.LABELS.index(label)
    for i in range(2):
        figures = script.evaluate_image(runner, randomised, True, label, first_seed + 100 * k + i,
                                        ("gradcam",))["gradcam"]
        assert figures["faithful"] == per_image[i], (label, i)

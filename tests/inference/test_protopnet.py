"""The prototype network: its layers, the shipped demo model (sha256, push exactness, held-out
figures on a few phantoms) and its training script's determinism on a tiny run (no real training)."""

import hashlib
import importlib.util
import io
import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from dicom_node.explain.prototypes import load_identities
from dicom_node.explain.sanity import verify_models
from dicom_node.inference import ModelRegistry
from dicom_node.inference.architectures import BUILDERS
from dicom_node.inference.manifest import ARCHITECTURES, ModelError
from dicom_node.inference.protopnet import EPSILON, ProtoPNet, similarity
from dicom_node.phantoms import LABELS

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "models" / "demo-protopnet"
HIT_FLOOR = 0.7  # the card reports the rate on 500 held-out phantoms; ten findings vary more


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_protopnet", FOLDER / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _script()


@pytest.fixture(scope="module")
def evaluate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evaluate_protopnet", FOLDER / "evaluate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model() -> ProtoPNet:
    module = ModelRegistry(REPO / "models").load("demo-protopnet").module
    assert isinstance(module, ProtoPNet)
    return module


def test_the_layers_give_maps_pooled_similarities_and_logits() -> None:
    torch.manual_seed(0)
    net = ProtoPNet(4, 1).eval()
    out = net.explain(torch.rand(2, 1, 64, 64))
    assert out.logits.shape == (2, 4) and out.similarities.shape == (2, 20)
    assert out.similarity_maps.shape == out.distances.shape == (2, 20, 16, 16)
    assert torch.allclose(out.similarities, out.similarity_maps.flatten(2).max(dim=2).values, atol=1e-6)
    assert torch.equal(net(torch.zeros(1, 1, 64, 64)), net.explain(torch.zeros(1, 1, 64, 64)).logits)
    assert float(similarity(torch.tensor(0.0))) == pytest.approx(np.log(1 / EPSILON))
    assert net.receptive_field() == (26, 4, 2.0) and net.patch_box(0, 0, 64) == (0, 0, 15, 15)
    assert "protopnet" in ARCHITECTURES and "protopnet" in BUILDERS


def test_a_prototype_at_a_feature_has_distance_zero_there() -> None:
    torch.manual_seed(1)
    net = ProtoPNet(2, 1, per_label=1).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        net.prototypes[0] = net.patch_features(x)[0, :, 3, 5].view(-1, 1, 1)
        distances = net.explain(x).distances
    assert float(distances[0, 0, 3, 5]) < 1e-5 and int(distances[0, 0].argmin()) == 3 * 8 + 5


def test_the_shipped_model_verifies_through_the_registry(tmp_path: Path) -> None:
    """``dicom-node models verify``'s path: sha256, architecture, outputs, the sanity check (cached)."""
    shutil.copytree(FOLDER, tmp_path / "demo-protopnet")
    [manifest] = ModelRegistry(tmp_path).verify()
    assert manifest.architecture == "protopnet" and manifest.label_names == LABELS
    [line] = verify_models(ModelRegistry(tmp_path))
    assert line.startswith("sanity demo-protopnet")
    card = (FOLDER / "MODEL_CARD.md").read_text()
    assert manifest.sha256 in card and "not for clinical use" in card
    (tmp_path / "demo-protopnet" / "weights.pt").write_bytes(b"changed")
    with pytest.raises(ModelError, match="sha256"):
        ModelRegistry(tmp_path).load("demo-protopnet")


def test_every_prototype_is_the_feature_of_its_training_patch(model: ProtoPNet, script: ModuleType) -> None:
    """Push is exact: the recorded phantom, re-rendered the training script's way, gives at the
    recorded cell a feature equal to the prototype; the box is that cell's receptive field."""
    identities = json.loads((FOLDER / "prototypes.json").read_text())
    assert [p["prototype"] for p in identities] == list(range(model.prototypes.shape[0]))
    for p in identities:
        assert p["seed"] < script.DEMO.HELD_OUT_SEED
        assert p["render_size"] == script.render_size(p["seed"], script.TRAIN_SIZES)
        image, labels = script.DEMO.example(p["seed"], 128, script.TRAIN_SIZES)[:2]
        assert labels[LABELS.index(p["label"])] == 1.0  # pushed onto an image that shows its label
        if p["label"] in ("nodule", "consolidation"):
            assert p["shows_finding"]  # and, for a focal finding, onto the finding
        with torch.no_grad():
            z = model.patch_features(torch.from_numpy(image)[None])
        row, column = p["cell"]
        prototype = model.prototypes[p["prototype"]].flatten()
        assert torch.allclose(z[0, :, row, column], prototype, atol=1e-5), p
        assert list(model.patch_box(row, column, 128)) == p["box_model"]


def test_held_out_phantoms_score_higher_when_they_show_the_finding(model: ProtoPNet, script: ModuleType) -> None:
    """Twelve held-out phantoms: for each label, every positive scores above every negative."""
    x, y, _ = script.dataset(range(script.DEMO.HELD_OUT_SEED, script.DEMO.HELD_OUT_SEED + 12), 128,
                          script.HELD_OUT_SIZES, 0)
    scores = script.probabilities(model, x)
    for k, label in enumerate(LABELS):
        positive, negative = scores[y[:, k] == 1, k], scores[y[:, k] == 0, k]
        assert len(positive) and len(negative), label
        assert positive.min() > negative.max(), label


def _weights(script: ModuleType) -> bytes:
    args = script.parser().parse_args(["--train", "24", "--held-out", "0", "--size", "64", "--epochs", "2",
                                       "--batch", "8", "--last-steps", "5", "--workers", "0", "--threads", "1"])
    model, metrics = script.fit(args)
    assert len(metrics["prototypes"]) == 20 and len(metrics["losses"]) == 2
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def test_a_tiny_training_run_gives_the_same_weights_twice(script: ModuleType) -> None:
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):  # fit seeds torch's global generator
            first, second = _weights(script), _weights(script)
    finally:
        torch.set_num_threads(threads)
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()


def test_the_top_prototype_points_at_focal_findings_of_held_out_phantoms(model: ProtoPNet,
                                                                         evaluate: ModuleType) -> None:
    """The card's localisation figure, recomputed by its own code on the first held-out phantoms
    that show a nodule or a consolidation (about ten findings)."""
    identities = load_identities(FOLDER / "prototypes.json", model, LABELS)
    figures = evaluate.figures_of(model, identities, range(evaluate.HELD_OUT_SEED, evaluate.HELD_OUT_SEED + 12), 128)
    focal = [figures[label] for label in ("nodule", "consolidation")]
    findings = sum(row["findings"] for row in focal)
    hits = sum(row["hit"] * row["findings"] for row in focal)
    assert findings >= 8
    assert hits / findings >= HIT_FLOOR
    assert all(row["hit"] > row["hit_area"] for row in focal)


def test_the_evaluation_sees_the_held_out_images_the_training_script_made(evaluate: ModuleType,
                                                                         script: ModuleType) -> None:
    """``evaluate.held_out`` repeats demo-cxr's ``example`` draws: the same seeds, the same input."""
    assert evaluate.HELD_OUT_SEED == script.DEMO.HELD_OUT_SEED
    seed = evaluate.HELD_OUT_SEED + 5
    _, item = evaluate.held_out(seed)
    x, _, _ = script.DEMO.example(seed, 128, script.HELD_OUT_SIZES)
    assert np.array_equal(item.array, x)


def test_the_logit_split_adds_up_to_the_logits(model: ProtoPNet, evaluate: ModuleType) -> None:
    """The card's own-label / other-label figures: their sum with the bias is each logit."""
    split = evaluate.logit_split(model, (evaluate.HELD_OUT_SEED + 16,), 128)
    assert len(split["rows"]) == len(LABELS)
    for row in split["rows"]:
        assert row["own"] + row["other"] + row["bias"] == pytest.approx(row["logit"], abs=0.03)
        assert row["other"] < 0 < row["own"]

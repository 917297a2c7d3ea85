"""Prototype explanations and their picture, on a small seeded network built here (no training)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.encode.overlay import CONTOUR, DISCLAIMER_COLOUR
from dicom_node.encode.prototype_overlay import _patch_rgb, blend_similarity, render_prototype_overlay
from dicom_node.explain.prototypes import (
    PrototypeIdentity,
    explain_prototypes,
    load_identities,
    prototype_patch,
)
from dicom_node.inference.manifest import InputSpec
from dicom_node.inference.preprocess import Preprocessed, preprocess
from dicom_node.inference.protopnet import ProtoPNet
from dicom_node.phantoms import LABELS, render, to_dataset


@pytest.fixture(scope="module")
def net() -> ProtoPNet:
    torch.manual_seed(0)
    return ProtoPNet(len(LABELS), 1).eval()


def _entries(count: int = 20) -> list[dict]:
    return [{"prototype": j, "label": LABELS[j // 5], "seed": 40 + j, "render_size": 256, "cell": [3, 4],
             "box_model": [5, 1, 31, 27], "box_source": [10, 2, 62, 54], "shows_finding": j % 2 == 0}
            for j in range(count)]


@pytest.fixture(scope="module")
def identities(net: ProtoPNet, tmp_path_factory: pytest.TempPathFactory) -> list[PrototypeIdentity]:
    path = tmp_path_factory.mktemp("p") / "prototypes.json"
    path.write_text(json.dumps(_entries()))
    return load_identities(path, net, LABELS)


@pytest.fixture(scope="module")
def item() -> Preprocessed:
    """A 300 x 240 frame (letterboxed into 128 px with padding) showing a nodule."""
    phantom = render(7, 300, findings={"nodule": True})
    ds = to_dataset(phantom)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, 30:270]).tobytes()
    ds.Columns = 240
    [frame] = preprocess(ds, InputSpec(size=128))
    return frame


def test_the_top_prototypes_of_a_label_come_with_maps_on_both_grids(
        net: ProtoPNet, identities: list[PrototypeIdentity], item: Preprocessed) -> None:
    [evidence] = explain_prototypes(net, item, LABELS, ["nodule"], identities, k=3).values()
    assert len(evidence) == 3 and {e.label for e in evidence} == {"nodule"}
    assert all(e.identity.prototype < 5 and e.identity.label == "nodule" for e in evidence)
    contributions = [e.contribution for e in evidence]
    assert contributions == sorted(contributions, reverse=True)
    for e in evidence:
        assert e.model_map.shape == (128, 128) and e.native_map.shape == (300, 240)
        assert np.unravel_index(np.argmax(e.model_map), e.model_map.shape) == e.peak_model[::-1]
        x, y = e.peak_source
        x0, y0, x1, y1 = e.region_source
        assert x0 <= x <= x1 and y0 <= y <= y1 and 0 <= x < 240 and 0 <= y < 300
        # the native map is the model map through the letterbox: equal at the peak's source point
        assert e.native_map[int(y), int(x)] == pytest.approx(e.model_map.max(), rel=0.05)


def test_labels_outside_the_model_and_bad_identity_files_are_refused(
        net: ProtoPNet, identities: list[PrototypeIdentity], item: Preprocessed, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'pneumothorax'"):
        explain_prototypes(net, item, LABELS, ["pneumothorax"], identities)
    entries = _entries()
    entries[3]["label"] = "effusion"
    (tmp_path / "p.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"p\.json: entry 3 .*expected prototype 3 of 'nodule'"):
        load_identities(tmp_path / "p.json", net, LABELS)
    (tmp_path / "p.json").write_text(json.dumps(_entries(19)))
    with pytest.raises(ValueError, match="expected a list of 20 prototypes"):
        load_identities(tmp_path / "p.json", net, LABELS)


def test_the_patch_is_re_rendered_from_the_seed(identities: list[PrototypeIdentity]) -> None:
    patch = prototype_patch(identities[0])
    assert patch.shape == (52, 52)
    assert np.array_equal(patch, render(40, 256).image[2:54, 10:62])


def test_the_picture_shows_band_region_and_patch_side_by_side(
        net: ProtoPNet, identities: list[PrototypeIdentity], item: Preprocessed) -> None:
    [[evidence]] = explain_prototypes(net, item, LABELS, ["nodule"], identities, k=1).values()
    display = np.full((300, 240, 3), 90, np.uint8)
    patch = prototype_patch(evidence.identity)
    picture = render_prototype_overlay(display, evidence, patch, "demo-protopnet", "1.0.0")
    factor = 1  # 300 px is at least the layout's minimum side: not scaled
    columns = 240 + 8 + 300  # the patch scaled to the image's height (square patch)
    assert picture.dtype == np.uint8 and picture.shape[1] == columns * factor
    band = picture.shape[0] - 300
    assert band > 0 and (picture[:band] == DISCLAIMER_COLOUR).all(axis=2).any()  # the disclaimer is drawn
    image = picture[band:, :240]
    blended = blend_similarity(display, evidence.native_map)
    untouched = (image == blended).all(axis=2)  # all but the region's box outline
    assert untouched.mean() > 0.95
    assert (picture[band:, 240:248] == 0).all()  # the gap stays black
    # the right-hand panel is the patch at the image's height, inside its one-pixel frame
    expected = _patch_rgb(patch, 300)
    assert expected.shape == (300, 300, 3) and expected.std() > 1  # a patch with content
    panel = picture[band:, 248:]
    assert panel.shape == expected.shape
    assert np.array_equal(panel[1:-1, 1:-1], expected[1:-1, 1:-1])
    assert (panel[0] == CONTOUR).all() and (panel[:, -1] == CONTOUR).all()
    with pytest.raises(ValueError, match="on the map's grid"):
        render_prototype_overlay(display[:200], evidence, patch, "demo-protopnet", "1.0.0")

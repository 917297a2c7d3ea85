"""The overlay of a real explanation, and where its annotations go: never over the image.

The placement test puts a lesion and its heatmap at every edge, every corner and the centre of
64, 512 and 4096 px images and checks that the image part of the overlay is the source with the
heatmap blended in and nothing else but the hot region's outline; the banner, the colour scale
and their text are all in the band above it. The legibility test measures the drawn cap height.
"""

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dicom_node.encode import Producer, hot_region, render_overlay, secondary_capture, source_display
from dicom_node.encode.layout import CAP_SHARE, MIN_CAP, MIN_SIDE, cap_bounds
from dicom_node.encode.overlay import CONTOUR, DISCLAIMER_COLOUR, _scale_label, blend_heatmap, overlay_layout
from dicom_node.explain.heatmap import Heatmap, explain_frame
from dicom_node.inference import InferenceRunner, ModelRegistry, preprocess
from dicom_node.phantoms import render, to_dataset
from dicom_node.phantoms.cross_section import cross_section

MODELS = Path(__file__).resolve().parents[2] / "models"
PLACES = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "centre": (1, 1),
          "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}


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
    display = source_display(source, 0)
    layout = overlay_layout(display, heatmap)
    assert layout.factor == 1 and (layout.image_rows, layout.image_columns) == (source.Rows, source.Columns)
    pixels = overlay.pixel_array[layout.image_slices]
    drawn = np.all(pixels == CONTOUR, axis=-1)
    rows, columns = np.nonzero(drawn)
    assert len(rows) > 20
    centre = int(np.median(rows)), int(np.median(columns))
    near = lesion[max(0, centre[0] - 40):centre[0] + 40, max(0, centre[1] - 40):centre[1] + 40]
    assert near.any(), "the drawn contour is not around the lesion"
    # where the map is not positive the viewer sees the source as its own viewer would
    # (MONOCHROME1 inverted), all the way to the image's edges; only the contour's line crosses
    # some of it
    cold = heatmap.native_map <= 0
    assert cold[: source.Rows // 8].any() and cold[source.Rows // 2:, source.Columns // 2:].any()
    assert np.mean(np.all(pixels[cold] == display[cold], axis=-1)) > 0.99


def _case(size: int, place: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray, Heatmap]:
    """A textured display, a lesion touching the ``place`` (row, column: 0 start, 1 middle, 2 end)
    of a ``size`` px image, and a heatmap whose hot region is the lesion."""
    rng = np.random.default_rng([seed, size, *place])
    display = cv2.resize(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), (size, size),
                         interpolation=cv2.INTER_LINEAR)
    side = max(4, size // 6)
    starts = [(0, (size - side) // 2, size - side)[p] for p in place]
    lesion = np.zeros((size, size), bool)
    lesion[starts[0]:starts[0] + side, starts[1]:starts[1] + side] = True
    # blurred on a 64 px grid and resized: a blur of the full 4096 px grid would take minutes
    small = cv2.resize(lesion.astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA)
    native = cv2.resize(cv2.GaussianBlur(small, (0, 0), 64 / 6 / 6), (size, size), interpolation=cv2.INTER_LINEAR)
    heatmap = Heatmap("1.2.3", 0, "nodule", 0.91, "gradcam", "features.norm5", "demo-cxr", "2.0.0", "ab" * 32,
                      native[::4, ::4], native, {})
    return display, lesion, heatmap


def _scaled(array: np.ndarray, factor: int) -> np.ndarray:
    return array if factor == 1 else np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def _differs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(rows, columns) bool: where two RGB images differ (channel by channel: a reduction over the
    last axis of a 4096 px image is ten times slower)."""
    diff = cv2.absdiff(a, b)
    return (diff[..., 0] | diff[..., 1] | diff[..., 2]) != 0


def _coloured(pixels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return (pixels[..., 0] == colour[0]) & (pixels[..., 1] == colour[1]) & (pixels[..., 2] == colour[2])


def _outline_ring(mask: np.ndarray, factor: int, width: int) -> np.ndarray:
    """Pixels of the scaled image within ``width`` of the scaled hot region's edge: where the
    outline may be drawn (computed around the region only: morphology on 4096 px is slow)."""
    scaled = _scaled(mask, factor).astype(np.uint8)
    rows, columns = np.flatnonzero(scaled.any(axis=1)), np.flatnonzero(scaled.any(axis=0))
    box = (slice(max(0, rows[0] - width - 1), rows[-1] + width + 2),
           slice(max(0, columns[0] - width - 1), columns[-1] + width + 2))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    ring = np.zeros(scaled.shape, bool)
    ring[box] = cv2.dilate(scaled[box], kernel).astype(bool) & ~cv2.erode(scaled[box], kernel).astype(bool)
    return ring


@pytest.mark.parametrize("size", [64, 512, 4096])
def test_annotations_cover_no_part_of_the_image_wherever_the_lesion_is(size: int) -> None:
    started = time.process_time()  # CPU time: other processes on the machine do not count
    for name, place in PLACES.items():
        display, lesion, heatmap = _case(size, place, seed=14)
        region = hot_region(heatmap.native_map)
        assert region is not None
        layout = overlay_layout(display, heatmap)
        pixels = render_overlay(display, heatmap)
        assert pixels.shape == (layout.rows, layout.columns, 3)
        factor = layout.factor
        assert factor == (4 if size == 64 else 1)
        assert (layout.image_rows, layout.image_columns) == (size * factor, size * factor)
        image = pixels[layout.image_slices]
        # the image part is the source with the map blended in, scaled by an integer factor;
        # the only other pixels drawn there are the hot region's outline, on its edge
        changed = _differs(image, _scaled(blend_heatmap(display, heatmap), factor))
        # the outline runs through the edge pixels' centres: half a source pixel inside the edge,
        # its line 2 px wide per 500 px, plus anti-aliasing and rounding (2 px)
        ring = _outline_ring(region.mask, factor, factor // 2 + 2 * max(1, round(size * factor / 500)) + 2)
        assert changed.any() and not (changed & ~ring).any(), f"{name}: pixels changed off the outline"
        # every pixel the map does not colour is the source's own, wherever the lesion lies
        cold = _scaled(heatmap.native_map <= heatmap.native_map.max() / 255, factor) & ~ring
        assert not (_differs(image, _scaled(display, factor)) & cold).any(), name
        # no annotation pixel (anything drawn outside the image part) is on the finding or its hot
        # region, mapped into the SC
        annotated = np.ones(pixels.shape[:2], bool)
        annotated[layout.image_slices] = False
        annotated &= (pixels[..., 0] | pixels[..., 1] | pixels[..., 2]) != 0  # the band is black
        regions = np.zeros(pixels.shape[:2], bool)
        regions[layout.image_slices] = _scaled(region.mask | lesion, factor)
        assert annotated.any() and regions.any() and not (annotated & regions).any(), name
        band = pixels[:layout.top]
        assert _coloured(band, DISCLAIMER_COLOUR).sum() > 20, f"{name}: the disclaimer is not in the band"
        assert not _coloured(pixels[layout.top:], DISCLAIMER_COLOUR).any(), name
    assert time.process_time() - started < 60  # 9 overlays of 4096 px and their checks: about 10 s


def _cap_height(pixels: np.ndarray, top: int) -> int:
    """Rows spanned by the first line of the disclaimer, where its colour covers at least half a
    pixel: the drawn cap height (the line is capitals, hyphens and dots only)."""
    band = pixels[:top].astype(np.int32)
    ink = (band[..., 0] >= 128) & (band[..., 2] < 40) & (band[..., 1] >= band[..., 0] * 0.7)
    rows = np.flatnonzero(ink.any(axis=1))
    assert len(rows), "no disclaimer drawn"
    end = rows[0]
    while end + 1 in rows:
        end += 1
    return int(end - rows[0] + 1)


@pytest.mark.parametrize(("rows", "columns"),
                         [(64, 64), (512, 512), (4096, 4096), (2048, 1680), (96, 2048), (2048, 40)])
def test_text_cap_height_stays_within_the_documented_bounds(rows: int, columns: int) -> None:
    display = np.full((rows, columns, 3), 60, np.uint8)
    native = np.zeros((rows, columns), np.float32)
    native[rows // 2, columns // 2] = 1
    heatmap = Heatmap("1.2.3", 0, "nodule", 0.91, "lime", "features.norm5", "demo-cxr", "2.0.0", "ab" * 32,
                      native, native, {})
    layout = overlay_layout(display, heatmap)
    pixels = render_overlay(display, heatmap)
    low, high = cap_bounds(max(layout.image_rows, layout.image_columns))
    measured = _cap_height(pixels, layout.top)
    # the cap height is that of flat letters (H, I, E); the disclaimer's A, G, S, O overshoot it
    # by up to 3 % plus a pixel, as they do in any font
    assert low <= measured <= high * 1.03 + 1, (measured, low, high)
    assert layout.cap <= measured <= layout.cap * 1.03 + 1
    assert MIN_CAP >= 7 and max(layout.image_rows, layout.image_columns) >= MIN_SIDE
    if min(rows, columns) >= 512:  # text grows with the image: a fixed share of its longer side
        assert measured >= CAP_SHARE * max(rows, columns) - 2
    # no text runs past the band's right edge (lines are wrapped to fit)
    ink = np.any(pixels[:layout.top - layout.thickness] > 0, axis=-1)
    assert not ink[:, layout.columns - layout.cap // 2:].any()


def test_a_small_image_is_scaled_up_and_the_sc_says_so(producer: Producer) -> None:
    piece = cross_section(5, "MR", size=64)
    source = piece.dataset
    native = cv2.GaussianBlur(piece.lesion.astype(np.float32), (0, 0), 3)
    heatmap = Heatmap(str(source.SOPInstanceUID), 0, "nodule", 0.91, "gradcam", "features.norm5", "demo-cxr",
                      "2.0.0", "ab" * 32, native, native, {})
    ds = secondary_capture(source, heatmap, producer, 1)
    layout = overlay_layout(source_display(source, 0), heatmap)
    assert layout.factor == 4 and ds.Columns == 256 and ds.Rows == layout.top + 256
    assert "scaled up x4" in ds.DerivationDescription
    assert any("x4" in words for words, _ in layout.lines)  # the banner says so too
    if "PixelSpacing" in source:
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([float(v) / 4 for v in source.PixelSpacing])
    again = secondary_capture(source, heatmap, producer, 1)
    assert np.array_equal(ds.pixel_array, again.pixel_array)  # deterministic
    assert ds.BurnedInAnnotation == "YES"


def test_a_fixed_colour_scale_colours_a_map_by_its_value_not_its_maximum() -> None:
    """Attention coefficients are drawn on 0-1: a slice whose highest coefficient is 0.4 is paler
    than one reaching 1, where a map relative to its maximum would look the same on both."""
    display = np.full((40, 40, 3), 100, dtype=np.uint8)
    values = np.zeros((40, 40), dtype=np.float32)
    values[10:30, 10:30] = 0.4

    def heatmap(scale_max: float | None) -> Heatmap:
        return Heatmap("1.2.3", 0, "lesion", 0.9, "attention", "gate.psi", "brain", "0.1", "ab" * 32,
                       values, values, scale_max=scale_max)

    change = {scale: np.abs(blend_heatmap(display, heatmap(scale)).astype(int) - 100)[20, 20].sum()
              for scale in (None, 1.0, 0.4)}
    assert 0 < change[1.0] < change[None] == change[0.4]
    assert np.array_equal(blend_heatmap(display, heatmap(1.0))[:10], display[:10])  # no colour where 0
    assert _scale_label(heatmap(1.0)) == "Attention gate, 0 to 1:"

"""Encoding speed: every output of a 2000x2000 CR with 4 labels explained, and the README figures.

The demo model explains all 4 labels of a 2000x2000 CR phantom (Grad-CAM, on the model grid,
mapped to the native grid) once; then the node encodes the Secondary Capture overlays (4), the
TID 1500 SR, the SEG and the GSPS (no Parametric Map: a CR has no Frame of Reference) and
serialises each to bytes. Printed: the median of ``--repeats`` runs per kind and in all.

``--figures DIR`` also writes the PNGs shown in the README: the overlay of each explanation
method, the SEG and the GSPS drawn over the source as a viewer shows them (1024 px phantom,
scaled to 512 px).

Usage: ``.venv/bin/python bench/encode.py [--repeats 5] [--figures docs/figures]``
"""

import argparse
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from dicom_node.encode import (
    Producer,
    hot_region,
    measurement_report,
    presentation_state,
    secondary_capture,
    segmentation,
    source_display,
)
from dicom_node.explain.heatmap import explain_frame
from dicom_node.inference import InferenceRunner, ModelRegistry, preprocess
from dicom_node.phantoms import LABELS, render, to_dataset

MODELS = Path(__file__).resolve().parents[1] / "models"
FIGURE_WIDTH = 512


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def serialised(ds: object) -> int:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)  # type: ignore[attr-defined]
    return buffer.tell()


def explained(runner: InferenceRunner, size: int, seed: int, methods: list[str], labels: list[str]):
    phantom = render(seed, size, findings=dict.fromkeys(LABELS, True))
    source = to_dataset(phantom, modality="CR", photometric="MONOCHROME1")
    loaded = runner.model("demo-cxr")
    [item] = preprocess(source, loaded.manifest.input)
    [prediction] = runner.predict("demo-cxr", [item])
    heatmaps = explain_frame(loaded, item, prediction, labels, methods, seed=seed)
    return phantom, source, prediction, heatmaps


def bench(runner: InferenceRunner, producer: Producer, repeats: int) -> None:
    started = time.perf_counter()
    _, source, prediction, heatmaps = explained(runner, 2000, 8_000_000, ["gradcam"], list(LABELS))
    print(f"2000x2000 CR, {len(heatmaps)} labels explained with Grad-CAM (with quality figures) in "
          f"{time.perf_counter() - started:.2f} s (not part of encoding)")
    overlays: dict = {}

    def sc() -> None:
        for number, h in enumerate(heatmaps, start=1):
            overlays[(h.sop_instance_uid, h.frame, h.label, h.method)] = ds = secondary_capture(
                source, h, producer, number)
            serialised(ds)

    rows = [
        ("4 Secondary Capture overlays", sc),
        ("TID 1500 SR", lambda: serialised(measurement_report([source], [prediction], heatmaps, producer,
                                                              overlays, ["gradcam"]))),
        ("SEG (4 segments)", lambda: serialised(segmentation(source, heatmaps, producer, 1))),
        ("GSPS", lambda: serialised(presentation_state(source, heatmaps, producer, 1))),
    ]
    print(f"{'object':<32}{'median ms':>10}   (median of {repeats}, each built and serialised)")
    total = 0.0
    for name, fn in rows:
        ms = median_ms(fn, repeats)
        total += ms
        print(f"{name:<32}{ms:>10.1f}")
    print(f"{'all outputs':<32}{total:>10.1f}")


def _save(path: Path, rgb: np.ndarray) -> None:
    height = round(rgb.shape[0] * FIGURE_WIDTH / rgb.shape[1])
    small = cv2.resize(rgb, (FIGURE_WIDTH, height), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(path), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    print(f"wrote {path}")


def figures(runner: InferenceRunner, producer: Producer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    methods = ["gradcam", "gradcampp", "hirescam", "lime"]
    _, source, _, heatmaps = explained(runner, 1024, 8_000_001, methods, ["consolidation", "nodule"])
    for h in heatmaps:
        if h.label == "consolidation":
            _save(folder / f"overlay-{h.method}.png", secondary_capture(source, h, producer, 1).pixel_array)
    gradcam = [h for h in heatmaps if h.method == "gradcam"]
    display = source_display(source, 0)
    seg = segmentation(source, gradcam, producer, 1)
    assert seg is not None
    masks = seg.pixel_array.reshape(len(gradcam), source.Rows, source.Columns)  # a frame per segment
    shown = display.copy()
    for mask, colour in zip(masks, [(0, 200, 255), (255, 120, 0)], strict=False):
        shown[mask > 0] = (0.5 * shown[mask > 0] + 0.5 * np.array(colour)).astype(np.uint8)
    _save(folder / "seg.png", shown)
    gsps = presentation_state(source, gradcam, producer, 1)
    assert gsps is not None
    shown = display.copy()
    annotation = gsps.GraphicAnnotationSequence[0]
    for graphic in annotation.GraphicObjectSequence:
        points = np.array(graphic.GraphicData, dtype=float).reshape(-1, 2) - 0.5
        cv2.polylines(shown, [np.round(points).astype(np.int32)], True, (255, 255, 0), 3, cv2.LINE_AA)
    for text in annotation.TextObjectSequence:
        if "AnchorPoint" in text:
            x, y = (int(v) for v in text.AnchorPoint)
            cv2.putText(shown, text.UnformattedTextValue, (x, max(20, y - 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.8,
                        (255, 255, 0), 2, cv2.LINE_AA)
    cv2.putText(shown, annotation.TextObjectSequence[0].UnformattedTextValue, (20, 40),
                cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 220, 0), 2, cv2.LINE_AA)
    _save(folder / "gsps.png", shown)
    assert all(hot_region(h.native_map) is not None for h in gradcam)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--figures", type=Path, help="also write the README's PNGs here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    runner = InferenceRunner(ModelRegistry(MODELS), device="cpu")
    producer = Producer("chest", runner.model("demo-cxr").manifest, "XAI_NODE")
    bench(runner, producer, args.repeats)
    if args.figures:
        figures(runner, producer, args.figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Results as DICOM: pure functions from source Datasets, predictions and heatmaps to Datasets.

- ``sc``: Secondary Capture overlays (:mod:`.overlay`), one per frame, label and method, and one
  per prototype of a prototype network's explanation (:mod:`.prototypes`);
- ``sr``: a TID 1500 Comprehensive 3D SR per analysed series (:mod:`.sr`, with a group per
  prototype from :mod:`.prototypes`), and the "not
  analysed" report for a series that could not be analysed;
- ``seg``: binary SEG of the hot regions of present findings (:mod:`.seg`);
- ``pm``: Parametric Maps of the heatmaps, for sources with a Frame of Reference (:mod:`.pmap`);
- ``gsps``: presentation states drawing the hot regions on the original (:mod:`.gsps`).

Every UID derives from the inputs, the model version and the method (:func:`.common.derived_uid`).
"""

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import Dataset

from dicom_node.encode.common import DISCLAIMER, Producer, check_one_series, derived_uid
from dicom_node.encode.fallback import minimal_report, not_analysed
from dicom_node.encode.gsps import presentation_state
from dicom_node.encode.header import HeaderChange, clean_header, restore_classes, stand_in
from dicom_node.encode.lesion import lesion_overlays, lesion_report, lesion_segmentation
from dicom_node.encode.overlay import render_overlay, secondary_capture, source_display
from dicom_node.encode.pmap import parametric_map
from dicom_node.encode.prototypes import keys, prototype_groups, prototype_overlays
from dicom_node.encode.region import HotRegion, hot_region
from dicom_node.encode.seg import segmentation
from dicom_node.encode.sr import (
    Revision,
    algorithm,
    measurement_report,
    not_analysed_report,
    report_reference,
)
from dicom_node.encode.study import clean_source
from dicom_node.explain.heatmap import Heatmap
from dicom_node.explain.prototypes import PrototypeExplanation
from dicom_node.explain.volume import VolumeMap
from dicom_node.inference.runner import Prediction
from dicom_node.inference.segment import VolumeSegmentation

logger = logging.getLogger(__name__)

OUTPUTS = ("sc", "sr", "seg", "pm", "gsps")
#: The outputs :func:`encode_volume` makes for a segmentation model (a subset of OUTPUTS).
VOLUME_OUTPUTS = ("seg", "sc", "sr")

__all__ = [
    "DISCLAIMER",
    "OUTPUTS",
    "VOLUME_OUTPUTS",
    "Encoded",
    "HeaderChange",
    "HotRegion",
    "Producer",
    "Revision",
    "clean_header",
    "clean_source",
    "derived_uid",
    "encode_results",
    "encode_series",
    "encode_volume",
    "hot_region",
    "measurement_report",
    "minimal_report",
    "not_analysed",
    "not_analysed_report",
    "parametric_map",
    "presentation_state",
    "render_overlay",
    "report_reference",
    "secondary_capture",
    "segmentation",
    "source_display",
]


@dataclass(frozen=True)
class Encoded:
    """What :func:`encode_series` made: the objects, the header changes made to the sources
    before copying from them (to audit; no values), and the kinds that failed (kind, error type)."""

    objects: list[Dataset]
    changes: tuple[HeaderChange, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()


def encode_results(sources: Sequence[Dataset], predictions: Sequence[Prediction], heatmaps: Sequence[Heatmap],
                   producer: Producer, outputs: Sequence[str], methods: Sequence[str] = (),
                   revision: Revision | None = None,
                   prototypes: Sequence[PrototypeExplanation] = ()) -> list[Dataset]:
    """The objects of :func:`encode_series`; an output kind that fails raises its error."""
    encoded = encode_series(sources, predictions, heatmaps, producer, outputs, methods, revision,
                            isolate=False, prototypes=prototypes)
    return encoded.objects


def encode_series(sources: Sequence[Dataset], predictions: Sequence[Prediction], heatmaps: Sequence[Heatmap],
                  producer: Producer, outputs: Sequence[str], methods: Sequence[str] = (),
                  revision: Revision | None = None, isolate: bool = True,
                  prototypes: Sequence[PrototypeExplanation] = ()) -> Encoded:
    """Every object ``outputs`` asks for, for one analysed series, from cleaned sources.

    Each source's header is cleaned once (:func:`.header.clean_header`). SEG and GSPS show only
    findings at or above their threshold; PM only where the source has a Frame of Reference; the
    SR covers every label of every analysed frame, references the overlays made here and, given a
    ``revision``, the earlier reports it replaces. ``prototypes``: a prototype network's
    explanations, as SC overlays and SR groups. ``sources`` must be of one study and series
    (ValueError otherwise). With ``isolate``, an output kind that fails is listed in
    :attr:`Encoded.failed` and the other kinds are still made.
    """
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ValueError(f"outputs: unknown {unknown}, expected some of {list(OUTPUTS)}")
    check_one_series(sources)
    cleaned = [clean_header(ds) for ds in sources]  # Pixel Data is shared: displays decode it
    changes = tuple(change for item in cleaned for change in item.changes)
    by_uid = {str(item.dataset.SOPInstanceUID): stand_in(item.dataset) for item in cleaned}
    classes = {str(item.dataset.SOPInstanceUID): str(item.dataset.SOPClassUID) for item in cleaned}
    built: dict[str, list[Dataset]] = {}
    failed: list[tuple[str, str]] = []
    for kind in [k for k in OUTPUTS if k in outputs]:  # SC before SR: the SR references overlays
        try:
            overlays = built.get("sc", [])
            built[kind] = _BUILDERS[kind](by_uid, predictions, Explanations(heatmaps, prototypes), producer,
                                          methods, overlays, revision)
        except Exception as exc:
            if not isolate:
                raise
            logger.warning("pipeline %s: %s output failed (%s)", producer.pipeline, kind, type(exc).__name__)
            failed.append((kind, type(exc).__name__))
    objects = [ds for kind in OUTPUTS for ds in built.get(kind, [])]
    for ds in objects:
        restore_classes(ds, classes)
    return Encoded(objects, changes, tuple(failed))


def encode_volume(sources: Sequence[Dataset], result: VolumeSegmentation, maps: Sequence[VolumeMap],
                  producer: Producer, outputs: Sequence[str], methods: Sequence[str] = (),
                  revision: Revision | None = None, isolate: bool = True) -> Encoded:
    """The objects of a segmentation model's results on one volume, from cleaned sources:
    ``seg`` the lesion SEG, ``sc`` the overlays of ``maps`` on the slices through each lesion,
    ``sr`` the report with the lesions' measurements (referencing the SEG and the overlays made
    here; without a SEG, the source images). ``pm`` and ``gsps`` are not made for volumes (start-up
    refuses them on a segmentation pipeline). Failures as :func:`encode_series`."""
    check_one_series(sources)
    cleaned = [clean_header(ds) for ds in sources]
    changes = tuple(change for item in cleaned for change in item.changes)
    by_uid = {str(item.dataset.SOPInstanceUID): stand_in(item.dataset) for item in cleaned}
    classes = {str(item.dataset.SOPInstanceUID): str(item.dataset.SOPClassUID) for item in cleaned}
    failed: list[tuple[str, str]] = []

    def build(kind: str, make: Callable[[], Any], empty: Any) -> Any:
        """``make()`` when ``outputs`` asks for ``kind``; ``empty`` when not, or when it fails (listed)."""
        if kind not in outputs:
            return empty
        try:
            return make()
        except Exception as exc:
            if not isolate:
                raise
            logger.warning("pipeline %s: %s output failed (%s)", producer.pipeline, kind, type(exc).__name__)
            failed.append((kind, type(exc).__name__))
            return empty

    # in this order: the SR references the SEG and the overlays
    seg: Dataset | None = build("seg", lambda: lesion_segmentation(by_uid, result, producer), None)
    overlays: list[tuple[str, Dataset]] = build(
        "sc", lambda: lesion_overlays(by_uid, result, maps, producer), [])
    report: list[Dataset] = build("sr", lambda: [lesion_report(list(by_uid.values()), result, producer, seg,
                                                              overlays, methods, revision)], [])
    objects = [*([seg] if seg is not None else []), *(ds for _, ds in overlays), *report]
    for ds in objects:
        restore_classes(ds, classes)
    return Encoded(objects, changes, tuple(failed))


Sources = dict[str, Dataset]


@dataclass(frozen=True)
class Explanations:
    """What explains the frames: heatmaps, and a prototype network's prototypes."""

    heatmaps: Sequence[Heatmap]
    prototypes: Sequence[PrototypeExplanation] = ()


#: One output kind's builder: the sources by SOP Instance UID, the predictions, the explanations,
#: the producer, the methods, the overlays already made (the SR references them) and the revision
#: (the SR supersedes the earlier reports it names).
Builder = Callable[[Sources, Sequence[Prediction], Explanations, Producer, Sequence[str], list[Dataset],
                    "Revision | None"], list[Dataset]]


def _overlays(by_uid: Sources, predictions: Sequence[Prediction], explanations: Explanations,
              producer: Producer, methods: Sequence[str], _: list[Dataset],
              __: Revision | None) -> list[Dataset]:
    """The heatmaps' overlays, then the prototypes' (numbered on)."""
    displays: dict[tuple[str, int], np.ndarray] = {}  # each frame decoded and windowed once
    overlays = []
    for number, heatmap in enumerate(explanations.heatmaps, start=1):
        source = by_uid[heatmap.sop_instance_uid]
        frame = (heatmap.sop_instance_uid, heatmap.frame)
        if frame not in displays:
            displays[frame] = source_display(source, heatmap.frame)
        overlays.append(secondary_capture(source, heatmap, producer, number, displays[frame]))
    return overlays + prototype_overlays(by_uid, explanations.prototypes, producer, len(overlays) + 1)


def _maps(by_uid: Sources, predictions: Sequence[Prediction], explanations: Explanations,
          producer: Producer, methods: Sequence[str], _: list[Dataset], __: Revision | None) -> list[Dataset]:
    maps = [parametric_map(by_uid[h.sop_instance_uid], h, producer, n)
            for n, h in enumerate(explanations.heatmaps, 1)]
    return [ds for ds in maps if ds is not None]


def _present(heatmaps: Sequence[Heatmap], producer: Producer) -> list[tuple[str, list[Heatmap]]]:
    present: dict[tuple[str, int, str], list[Heatmap]] = defaultdict(list)
    for heatmap in heatmaps:
        if heatmap.probability >= producer.threshold(heatmap.label):
            present[(heatmap.sop_instance_uid, heatmap.frame, heatmap.method)].append(heatmap)
    return [(uid, group) for (uid, _, _), group in sorted(present.items())]


def _regions(build: Callable[..., Dataset | None]) -> Builder:
    """SEG and GSPS: the hot regions of the heatmaps (prototypes have their SR points instead)."""
    def regions(by_uid: Sources, predictions: Sequence[Prediction], explanations: Explanations,
                producer: Producer, methods: Sequence[str], _: list[Dataset],
                __: Revision | None) -> list[Dataset]:
        built = [build(by_uid[uid], group, producer, number)
                 for number, (uid, group) in enumerate(_present(explanations.heatmaps, producer), start=1)]
        return [ds for ds in built if ds is not None]
    return regions


def _report(by_uid: Sources, predictions: Sequence[Prediction], explanations: Explanations,
            producer: Producer, methods: Sequence[str], overlays: list[Dataset],
            revision: Revision | None) -> list[Dataset]:
    heatmaps, prototypes = explanations.heatmaps, explanations.prototypes
    keys_ = [(h.sop_instance_uid, h.frame, h.label, h.method) for h in heatmaps]
    proto_keys = keys(prototypes)
    complete = len(overlays) == len(keys_) + len(proto_keys)
    by_key = dict(zip(keys_, overlays[:len(keys_)], strict=True)) if complete else {}
    by_prototype = dict(zip(proto_keys, overlays[len(keys_):], strict=True)) if complete else {}
    groups = prototype_groups(by_uid, prototypes, producer, algorithm(producer, methods), by_prototype)
    return [measurement_report(list(by_uid.values()), predictions, heatmaps, producer, by_key, methods,
                               revision, groups, list(by_prototype.values()))]


_BUILDERS: dict[str, Builder] = {"sc": _overlays, "pm": _maps, "seg": _regions(segmentation),
                                 "gsps": _regions(presentation_state), "sr": _report}

"""Results as DICOM: pure functions from source Datasets, predictions and heatmaps to Datasets.

- ``sc``: Secondary Capture overlays (:mod:`.overlay`), one per frame, label and method;
- ``sr``: a TID 1500 Comprehensive 3D SR per analysed series (:mod:`.sr`), and the "not
  analysed" report for a series that could not be analysed;
- ``seg``: binary SEG of the hot regions of present findings (:mod:`.seg`);
- ``pm``: Parametric Maps of the heatmaps, for sources with a Frame of Reference (:mod:`.pmap`);
- ``gsps``: presentation states drawing the hot regions on the original (:mod:`.gsps`).

Every UID derives from the inputs, the model version and the method (:func:`.common.derived_uid`).
"""

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset

from dicom_node.encode.common import DISCLAIMER, Producer, check_one_series, derived_uid
from dicom_node.encode.gsps import presentation_state
from dicom_node.encode.overlay import render_overlay, secondary_capture, source_display
from dicom_node.encode.pmap import parametric_map
from dicom_node.encode.region import HotRegion, hot_region
from dicom_node.encode.seg import segmentation
from dicom_node.encode.sr import Revision, measurement_report, not_analysed_report, report_reference
from dicom_node.encode.study import clean_source
from dicom_node.explain.heatmap import Heatmap
from dicom_node.inference.runner import Prediction

OUTPUTS = ("sc", "sr", "seg", "pm", "gsps")

__all__ = [
    "DISCLAIMER", "OUTPUTS", "HotRegion", "Producer", "Revision", "clean_source", "derived_uid",
    "encode_results",
    "hot_region",
    "measurement_report", "not_analysed_report", "parametric_map", "presentation_state", "render_overlay",
    "report_reference", "secondary_capture", "segmentation", "source_display",
]


def encode_results(sources: Sequence[Dataset], predictions: Sequence[Prediction], heatmaps: Sequence[Heatmap],
                   producer: Producer, outputs: Sequence[str], methods: Sequence[str] = (),
                   revision: Revision | None = None) -> list[Dataset]:
    """Every object ``outputs`` asks for, for one analysed series.

    SEG and GSPS show only findings at or above their threshold; PM only where the source has a
    Frame of Reference; the SR covers every label of every analysed frame, references the
    overlays made here and, given a ``revision``, the earlier reports it replaces. ``sources``
    must be of one study and series (ValueError otherwise).
    """
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ValueError(f"outputs: unknown {unknown}, expected some of {list(OUTPUTS)}")
    check_one_series(sources)
    # each builder writes from a cleaned copy (encode.study.clean_source); the originals keep the
    # pixels preprocessing already decoded
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    results: list[Dataset] = []
    overlays: dict[tuple[str, int, str, str], Dataset] = {}
    if "sc" in outputs:
        displays: dict[tuple[str, int], np.ndarray] = {}  # each frame decoded and windowed once
        for number, heatmap in enumerate(heatmaps, start=1):
            source = by_uid[heatmap.sop_instance_uid]
            frame = (heatmap.sop_instance_uid, heatmap.frame)
            if frame not in displays:
                displays[frame] = source_display(source, heatmap.frame)
            key = (heatmap.sop_instance_uid, heatmap.frame, heatmap.label, heatmap.method)
            overlays[key] = secondary_capture(source, heatmap, producer, number, displays[frame])
        results += overlays.values()
    if "pm" in outputs:
        maps = [parametric_map(by_uid[h.sop_instance_uid], h, producer, n) for n, h in enumerate(heatmaps, 1)]
        results += [ds for ds in maps if ds is not None]
    present: dict[tuple[str, int, str], list[Heatmap]] = defaultdict(list)
    for heatmap in heatmaps:
        if heatmap.probability >= producer.threshold(heatmap.label):
            present[(heatmap.sop_instance_uid, heatmap.frame, heatmap.method)].append(heatmap)
    for kind, build in (("seg", segmentation), ("gsps", presentation_state)):
        if kind in outputs:
            built = [build(by_uid[uid], group, producer, number)
                     for number, ((uid, _, _), group) in enumerate(sorted(present.items()), start=1)]
            results += [ds for ds in built if ds is not None]
    if "sr" in outputs:
        results.append(measurement_report(sources, predictions, heatmaps, producer, overlays, methods,
                                          revision))
    return results

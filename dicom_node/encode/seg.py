"""Binary Segmentations of the hot regions (PS3.3 A.51): one per source frame and method, one
segment per explained label whose finding is present."""

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset

from dicom_node import __version__
from dicom_node.encode.common import METHOD_NAMES, Producer, mark_derived
from dicom_node.encode.header import legacy_multi_frame, multi_frame
from dicom_node.encode.region import hot_region
from dicom_node.encode.study import clean_source, orientation
from dicom_node.explain.heatmap import Heatmap

ABNORMAL = CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
ARTIFICIAL_INTELLIGENCE = CodedConcept("123110", "DCM", "Artificial Intelligence")


def algorithm_identification(producer: Producer, method: str) -> hd.AlgorithmIdentificationSequence:
    manifest = producer.manifest
    return hd.AlgorithmIdentificationSequence(
        name=manifest.name, version=manifest.version, family=ARTIFICIAL_INTELLIGENCE,
        source=f"dicom-node {__version__}",
        parameters={"explanation": METHOD_NAMES.get(method, method), "weights sha256": manifest.sha256,
                    "pipeline": producer.pipeline},
    )


def segmentation(source: Dataset, heatmaps: Sequence[Heatmap], producer: Producer,
                 instance_number: int) -> hd.seg.Segmentation | None:
    """The hot regions of ``heatmaps`` (one source frame, one method) as a binary SEG, or None
    when no heatmap has a hot region, the source is a multi-frame image without functional
    groups, or a plane whose geometry was unfit to copy."""
    if legacy_multi_frame(source):
        return None
    if "FrameOfReferenceUID" in source and "ImageOrientationPatient" not in source:
        return None  # a plane whose geometry encode.header dropped: no Plane Position to state
    regions = [(h, hot_region(h.native_map)) for h in heatmaps]
    kept = [(h, r) for h, r in regions if r is not None]
    if not kept:
        return None
    method, frame = kept[0][0].method, kept[0][0].frame
    source = clean_source(source)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"{h.label} ({METHOD_NAMES.get(method, method)} hot region)"[:64],
            segmented_property_category=ABNORMAL, segmented_property_type=producer.label_code(h.label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_identification(producer, method),
            tracking_uid=producer.instance_uid("tracking", source, str(source.SOPInstanceUID), str(frame),
                                               h.label),
            tracking_id=h.label,
        )
        for number, (h, _) in enumerate(kept, start=1)
    ]
    masks = np.stack([r.mask for _, r in kept], axis=-1)[None]  # (1, rows, columns, segments)
    if multi_frame(source):
        masks = np.zeros((int(source.NumberOfFrames), *masks.shape[1:]), dtype=bool)
        masks[frame] = np.stack([r.mask for _, r in kept], axis=-1)
    ds = hd.seg.Segmentation(
        source_images=[source], pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=producer.series_uid("seg", source, method),
        series_number=producer.series_number("seg", method),
        sop_instance_uid=producer.instance_uid("seg", source, method, str(source.SOPInstanceUID), str(frame)),
        instance_number=instance_number, manufacturer=producer.manufacturer,
        manufacturer_model_name=producer.model_name[:64], software_versions=producer.software_versions,
        device_serial_number=producer.station, content_label="AI_HOT_REGION",
        content_description=f"AI {METHOD_NAMES.get(method, method)} hot regions, unverified"[:64],
    )
    if "FrameOfReferenceUID" not in source:  # a radiograph: the source's orientation (Type 2C)
        ds.PatientOrientation = list(orientation(source) or [])
    ds.SeriesDescription = producer.description("hot regions", method)
    mark_derived(ds, [source], producer, f"{METHOD_NAMES.get(method, method)} maps thresholded at half "
                 "their maximum, the connected part holding the maximum")
    return ds

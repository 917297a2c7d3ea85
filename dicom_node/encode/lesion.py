"""A segmentation model's results for one volume: the lesion SEG on the source's frame of
reference, SC overlays of the explanation maps on the slices through the lesion, and a TID 1500
report with each label's lesions measured (TID 1411 with the SEG's segment as its region; TID
1501 naming the source images when no SEG was made).

The SEG is built by highdicom from the source instances themselves: one frame per source slice
that holds a lesion voxel, each referencing its source instance (and frame, for an enhanced
multi-frame source), with the source's plane position and orientation; one segment per label
with a lesion. The mask is the pipeline's, on the source grid, unchanged.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_node import __version__
from dicom_node.encode.common import (
    ABSENT,
    LESIONS,
    PRESENT,
    PROBABILITY,
    UNITLESS,
    Producer,
    mark_derived,
)
from dicom_node.encode.overlay import secondary_capture, source_display
from dicom_node.encode.seg import ABNORMAL, ARTIFICIAL_INTELLIGENCE
from dicom_node.encode.sr import ILLUSTRATION, Group, Revision, _content, _document, algorithm
from dicom_node.encode.study import clean_source
from dicom_node.explain.heatmap import Heatmap
from dicom_node.explain.volume import VolumeMap
from dicom_node.inference.segment import VolumeSegmentation, lesion_slices

VOLUME = CodedConcept("118565006", "SCT", "Volume")
DIAMETER = CodedConcept("81827009", "SCT", "Diameter")
MAXIMUM = CodedConcept("56851009", "SCT", "Maximum")
TOTAL = CodedConcept("255619001", "SCT", "Total")
VOXEL_SUM = CodedConcept("126030", "DCM", "Sum of segmented voxel volumes")
CUBIC_MILLIMETRE = CodedConcept("mm3", "UCUM", "cubic millimeter")
MILLIMETRE = CodedConcept("mm", "UCUM", "millimeter")
Sources = Mapping[str, Dataset]


def lesion_segmentation(by_uid: Sources, result: VolumeSegmentation, producer: Producer) -> Dataset | None:
    """The masks of the labels with a lesion as one binary SEG, or None when no label has one.

    Raises
    ------
    ValueError
        When the slices come from several multi-frame instances (not one per slice, nor one).
    """
    found = result.found()
    if not found:
        return None
    slices = result.volume.sources
    instances = list(dict.fromkeys(s.sop_instance_uid for s in slices))
    masks = np.moveaxis(result.masks[[result.labels.index(label) for label in found]], 0, -1)  # (K, R, C, S)
    if len(instances) == len(slices):
        sources = [clean_source(by_uid[s.sop_instance_uid]) for s in slices]  # frame k is slice k
        pixels = masks
    elif len(instances) == 1:
        sources = [clean_source(by_uid[instances[0]])]
        pixels = np.zeros((int(sources[0].NumberOfFrames), *masks.shape[1:]), dtype=bool)
        for k, source in enumerate(slices):
            pixels[source.frame - 1] = masks[k]
    else:
        raise ValueError(f"SEG: the volume's slices come from {len(instances)} multi-frame instances; "
                         "one instance per slice or one multi-frame instance is supported")
    manifest = producer.manifest
    identification = hd.AlgorithmIdentificationSequence(
        name=manifest.name, version=manifest.version, family=ARTIFICIAL_INTELLIGENCE,
        source=f"dicom-node {__version__}",
        parameters={"weights sha256": manifest.sha256, "pipeline": producer.pipeline})
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=f"{label} (AI, unverified)"[:64],
        segmented_property_category=ABNORMAL, segmented_property_type=producer.label_code(label),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=identification,
        tracking_uid=producer.instance_uid("tracking", sources[0], "lesion", label), tracking_id=label)
        for number, label in enumerate(found, start=1)]
    ds = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=producer.series_uid("seg", sources[0], "lesion"),
        series_number=producer.series_number("seg"),
        sop_instance_uid=producer.instance_uid("seg", sources[0], "lesion", *instances),
        instance_number=1, manufacturer=producer.manufacturer,
        manufacturer_model_name=producer.model_name[:64], software_versions=producer.software_versions,
        device_serial_number=producer.station, content_label="AI_LESION",
        content_description=f"AI lesion segmentation {manifest.name}, unverified"[:64],
    )
    ds.SeriesDescription = producer.description("lesion segmentation")
    mark_derived(ds, sources, producer, "Sigmoid maps of the model, mapped from the model grid to the source "
                 "grid linearly and thresholded there at each label's threshold")
    return ds


def _peak_outside(item: VolumeMap, mask: np.ndarray) -> bool:
    """Whether the map's maximum over the volume falls outside the label's predicted mask (the
    model-grid voxel of the maximum, mapped to its nearest source voxel)."""
    peak = np.unravel_index(int(np.argmax(item.array)), item.array.shape)
    mapping = item.mapping
    index = tuple(int(np.clip(round(scale * i + offset), 0, n - 1)) for i, scale, offset, n
                  in zip(peak, mapping.scale, mapping.offset, mapping.source_shape, strict=True))
    return not bool(mask[index])


def _heatmap(source: Dataset, frame: int, item: VolumeMap, k: int, probability: float,
             producer: Producer, peak_outside: bool) -> Heatmap:
    """The SC's map of slice ``k``. Every slice of one map is on the same colour scale, so that a
    slice the map barely touches is not shown in full colour: attention coefficients from 0 to 1,
    Seg-Grad-CAM from 0 to its maximum over the whole volume."""
    manifest = producer.manifest
    shown = item.source_slice(k)
    notes = []
    if item.method == "attention":
        about = f"attention coefficients of gate {item.layer}"
    else:
        about = (f"gradient of the mean '{item.label}' logit over its mask, layer {item.layer}; "
                 "scaled to its maximum over the whole volume")
        peak = float(item.array.max())
        shown = shown / peak if peak > 0 else shown
    notes.append(f"Lesion slice: {about}")
    if peak_outside:
        notes.append("Caution: this map's maximum lies outside the segmented lesion")
    return Heatmap(str(source.SOPInstanceUID), frame - 1, item.label, probability, item.method, item.layer,
                   manifest.name, manifest.version, manifest.sha256, shown, shown,
                   notes=tuple(notes), scale_max=1.0)


def lesion_overlays(by_uid: Sources, result: VolumeSegmentation, maps: Sequence[VolumeMap],
                    producer: Producer) -> list[tuple[str, Dataset]]:
    """(label, SC) for every map on the slices through its label's lesion (:func:`lesion_slices`)."""
    displays: dict[tuple[str, int], np.ndarray] = {}
    overlays: list[tuple[str, Dataset]] = []
    for item in maps:
        probability = float(result.probabilities[result.labels.index(item.label)].max())
        mask = result.mask(item.label)
        outside = item.method != "attention" and _peak_outside(item, mask)
        for k in lesion_slices(mask):
            slice_source = result.volume.sources[k]
            source = by_uid[slice_source.sop_instance_uid]
            heatmap = _heatmap(source, slice_source.frame, item, k, probability, producer, outside)
            key = (slice_source.sop_instance_uid, heatmap.frame)
            if key not in displays:
                displays[key] = source_display(source, heatmap.frame)
            ds = secondary_capture(source, heatmap, producer, len(overlays) + 1, displays[key])
            # several gates share the method: the gate is part of the UID
            uid = producer.instance_uid("sc", source, item.method, item.layer, slice_source.sop_instance_uid,
                                        str(heatmap.frame), item.label)
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            overlays.append((item.label, ds))
    return overlays


def _measurements(result: VolumeSegmentation, label: str,
                  algorithm_id: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    """Volume (Total: every lesion of the label), Number of lesions (26-connected components),
    Volume (Maximum: the largest lesion's), Diameter (Maximum: the largest lesion's largest
    distance between voxel centres), the highest probability."""
    measured = result.measurements[label]
    probability = round(float(result.probabilities[result.labels.index(label)].max()), 6)
    return [
        hd.sr.Measurement(name=VOLUME, value=round(measured.total_volume_mm3, 3), unit=CUBIC_MILLIMETRE,
                          derivation=TOTAL, method=VOXEL_SUM, algorithm_id=algorithm_id),
        hd.sr.Measurement(name=LESIONS, value=measured.lesions, unit=UNITLESS, algorithm_id=algorithm_id),
        hd.sr.Measurement(name=VOLUME, value=round(measured.largest_volume_mm3, 3), unit=CUBIC_MILLIMETRE,
                          derivation=MAXIMUM, method=VOXEL_SUM, algorithm_id=algorithm_id),
        hd.sr.Measurement(name=DIAMETER, value=round(measured.largest_diameter_mm, 3), unit=MILLIMETRE,
                          derivation=MAXIMUM, algorithm_id=algorithm_id),
        hd.sr.Measurement(name=PROBABILITY, value=probability, unit=UNITLESS, derivation=MAXIMUM,
                          algorithm_id=algorithm_id),
    ]


def _lesion_group(sources: Sequence[Dataset], result: VolumeSegmentation, label: str, seg: Dataset | None,
                  producer: Producer, algorithm_id: hd.sr.AlgorithmIdentification,
                  illustrations: Sequence[Dataset]) -> Group:
    """One label's lesions: TID 1411 with the SEG's segment as its region, or, without a SEG (not
    among the outputs, or failed), TID 1501 naming the source images that hold the lesions."""
    finding = producer.label_code(label)
    tracking = hd.sr.TrackingIdentifier(uid=producer.instance_uid("tracking", sources[0], "lesion", label),
                                        identifier=label)
    common: dict[str, Any] = {
        "tracking_identifier": tracking, "finding_type": finding, "algorithm_id": algorithm_id,
        "measurements": _measurements(result, label, algorithm_id),
        "qualitative_evaluations": [hd.sr.QualitativeEvaluation(finding, PRESENT)]}
    group: Group
    if seg is not None:
        number = result.found().index(label) + 1
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(str(sources[0].SeriesInstanceUID)))
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=referenced, **common)
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=_lesion_images(sources, result, label), **common)
    group[0].ContentSequence.extend(
        hd.sr.ImageContentItem(ILLUSTRATION, ds.SOPClassUID, ds.SOPInstanceUID, relationship_type="CONTAINS")
        for ds in illustrations)
    return group


def _lesion_images(sources: Sequence[Dataset], result: VolumeSegmentation,
                   label: str) -> list[hd.sr.SourceImageForMeasurementGroup]:
    """The source instances (and frames, of a multi-frame one) of the slices with a lesion voxel."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    frames: dict[str, list[int]] = {}
    mask = result.mask(label)
    for k, slice_source in enumerate(result.volume.sources):
        if mask[k].any():
            frames.setdefault(slice_source.sop_instance_uid, []).append(slice_source.frame)
    images = []
    for uid, numbers in frames.items():
        ds = by_uid[uid]
        frame_numbers = sorted(numbers) if int(ds.get("NumberOfFrames", 1) or 1) > 1 else None
        images.append(hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID,
                                                           referenced_frame_numbers=frame_numbers))
    return images


def _absent(result: VolumeSegmentation, label: str, producer: Producer) -> hd.sr.CodeContentItem:
    item = hd.sr.CodeContentItem(producer.label_code(label), ABSENT, relationship_type="CONTAINS")
    item.ContentSequence = DicomSequence([hd.sr.NumContentItem(
        PROBABILITY, round(float(result.probabilities[result.labels.index(label)].max()), 6), UNITLESS,
        relationship_type="HAS PROPERTIES")])
    return item


def lesion_report(sources: Sequence[Dataset], result: VolumeSegmentation, producer: Producer,
                  seg: Dataset | None, overlays: Sequence[tuple[str, Dataset]], methods: Sequence[str] = (),
                  revision: Revision | None = None) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of one segmented volume: per label with a lesion one group
    (:func:`_measurements`, the SEG segment or the source images, the overlays as Illustration
    of ROI); every label without one as a document-level "absent" evaluation."""
    sources = [clean_source(ds) for ds in sources]
    algorithm_id = algorithm(producer, methods)
    found = result.found()
    groups = [_lesion_group(sources, result, label, seg, producer, algorithm_id,
                            [ds for owner, ds in overlays if owner == label]) for label in found]
    evaluations = [_absent(result, label, producer) for label in result.labels if label not in found]
    content = _content(sources, groups, evaluations, producer)
    evidence = [*sources, *([seg] if seg is not None else []), *(ds for _, ds in overlays)]
    return _document(sources, evidence, content, producer, "sr", revision)


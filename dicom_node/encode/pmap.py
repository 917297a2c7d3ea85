"""Parametric Maps of heatmaps (PS3.3 A.75) for sources with a Frame of Reference (CT, MR).

The map's values are the raw, signed explanation on the source grid, in float; the Real World
Value Mapping's quantity is DCM's code for the method (130403 Gradient-weighted class
activation, 130404 Saliency). Radiographs (CR, DX) have no Frame of Reference and get none.
Every map carries the Frame Anatomy functional group: dcmqi (3D Slicer's reader) dereferences it
without checking, and crashes on a map without it.
"""

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code

from dicom_node.encode.common import METHOD_CODES, METHOD_NAMES, UNITLESS, Producer, mark_derived
from dicom_node.encode.study import clean_source
from dicom_node.explain.heatmap import Heatmap

#: Body Part Examined (PS3.16 Annex L) as SNOMED CT anatomic regions; others are "Body tissue".
BODY_PARTS = {
    "CHEST": Code("51185008", "SCT", "Chest"), "HEAD": Code("69536005", "SCT", "Head"),
    "BRAIN": Code("12738006", "SCT", "Brain"), "ABDOMEN": Code("113345001", "SCT", "Abdomen"),
    "PELVIS": Code("12921003", "SCT", "Pelvis"), "NECK": Code("45048000", "SCT", "Neck"),
}
TISSUE = Code("85756007", "SCT", "Body tissue")


def frame_anatomy(source: Dataset) -> Dataset:
    """PS3.3 C.7.6.16.2.8 Frame Anatomy of every frame: the source's body part, laterality unpaired."""
    code = BODY_PARTS.get(str(source.get("BodyPartExamined", "") or "").upper(), TISSUE)
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator = code.value, code.scheme_designator
    region.CodeMeaning = code.meaning
    item = Dataset()
    item.AnatomicRegionSequence = [region]
    item.FrameLaterality = "U"
    return item


def has_frame_of_reference(source: Dataset) -> bool:
    """A Frame of Reference and the plane's geometry: orientation and a (valid) Slice Thickness,
    which the map's Pixel Measures need (encode.header drops an unfit one)."""
    return all(k in source for k in ("FrameOfReferenceUID", "ImageOrientationPatient", "SliceThickness"))


def parametric_map(source: Dataset, heatmap: Heatmap, producer: Producer,
                   instance_number: int) -> Dataset | None:
    """``heatmap`` as a Parametric Map over ``source``, or None when the source has no Frame of
    Reference (a single-frame CT or MR image; one frame)."""
    if not has_frame_of_reference(source) or int(source.get("NumberOfFrames", 1) or 1) > 1:
        return None
    values = np.nan_to_num(heatmap.native_map.astype(np.float32))
    source = clean_source(source)
    method_name = METHOD_NAMES.get(heatmap.method, heatmap.method)
    low, high = float(values.min()), float(values.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=heatmap.method[:16], lut_explanation=f"{method_name} of {heatmap.label}"[:64],
        unit=UNITLESS,
        value_range=(low, high if high > low else low + 1.0), slope=1.0, intercept=0.0,
        quantity_definition=METHOD_CODES.get(heatmap.method, METHOD_CODES["lime"]),
    )
    ds = hd.pm.ParametricMap(
        source_images=[source], pixel_array=values, series_instance_uid=producer.series_uid(
            "pm", source, heatmap.method), series_number=producer.series_number("pm", heatmap.method),
        sop_instance_uid=producer.instance_uid("pm", source, heatmap.method, str(source.SOPInstanceUID),
                                               heatmap.label),
        instance_number=instance_number, manufacturer=producer.manufacturer,
        manufacturer_model_name=producer.model_name[:64], software_versions=producer.software_versions,
        device_serial_number=producer.station, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], content_label="AI_HEATMAP",
        voi_lut_transformations=[hd.VOILUTTransformation(
            window_center=(low + high) / 2, window_width=max(high - low, 1e-6),
            voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT)],
        content_description=f"AI {method_name} of {heatmap.label}, unverified"[:64],
    )
    ds.SeriesDescription = producer.description("heatmaps", heatmap.method)
    ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [frame_anatomy(source)]
    mark_derived(ds, [source], producer, f"{method_name} of '{heatmap.label}' (layer {heatmap.layer}), "
                 "raw values on the source grid")
    return ds

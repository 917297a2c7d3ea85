"""Grayscale Softcopy Presentation States (PS3.3 A.33.1): the hot regions drawn over the untouched
original, for viewers that honour GSPS; one per source frame and method."""

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset

from dicom_node.encode.common import DISCLAIMER_TEXT, METHOD_NAMES, Producer, mark_equipment
from dicom_node.encode.header import legacy_multi_frame, multi_frame
from dicom_node.encode.region import hot_region
from dicom_node.encode.study import clean_source
from dicom_node.explain.heatmap import Heatmap


def presentation_state(source: Dataset, heatmaps: Sequence[Heatmap], producer: Producer,
                       instance_number: int) -> Dataset | None:
    """The hot-region ellipses and outlines of ``heatmaps`` (one frame, one method) with their
    labels and the AI notice, or None when none has a hot region, the source is in colour or a
    multi-frame image without functional groups (:func:`.header.legacy_multi_frame`)."""
    kept = [(h, r) for h in heatmaps if (r := hot_region(h.native_map)) is not None]
    # a colour image needs a Color Softcopy Presentation State; its overlay (SC) shows the regions
    colour = source.get("SamplesPerPixel", 1) != 1 \
        or source.get("PhotometricInterpretation") == "PALETTE COLOR"
    if not kept or colour or legacy_multi_frame(source):
        return None
    method, frame = kept[0][0].method, kept[0][0].frame
    method_name = METHOD_NAMES.get(method, method)
    source = clean_source(source)
    layer = hd.pr.GraphicLayer(layer_name="AI", order=1, description=DISCLAIMER_TEXT[:64])
    graphics, texts = [], [hd.pr.TextObject(
        DISCLAIMER_TEXT, units="DISPLAY", bounding_box=(0.02, 0.01, 0.98, 0.05))]
    for heatmap, region in kept:
        graphics.append(hd.pr.GraphicObject("POLYLINE", region.contour, units="PIXEL"))
        column, row = region.contour[:, 0].min(), region.contour[:, 1].min()
        texts.append(hd.pr.TextObject(
            f"{heatmap.label} p={heatmap.probability:.2f} ({method_name})", units="PIXEL",
            anchor_point=(float(column), float(row)), anchor_point_visible=False))
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[source], graphic_layer=layer, graphic_objects=graphics, text_objects=texts,
        referenced_frame_number=frame + 1 if multi_frame(source) else None)
    ds = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source], series_instance_uid=producer.series_uid("gsps", source, method),
        series_number=producer.series_number("gsps", method),
        sop_instance_uid=producer.instance_uid("gsps", source, method, str(source.SOPInstanceUID),
                                               str(frame)),
        instance_number=instance_number, manufacturer=producer.manufacturer,
        manufacturer_model_name=producer.model_name[:64], software_versions=producer.software_versions,
        device_serial_number=producer.station, content_label="AI_HOT_REGIONS",
        content_description=f"AI {method_name} hot regions, unverified"[:64],
        graphic_annotations=[annotation], graphic_layers=[layer],
        # a presentation state overrides the image's photometric interpretation: keep MONOCHROME1
        # sources the way round their own viewers show them
        presentation_lut_transformation=hd.PresentationLUTTransformation(presentation_lut_shape=(
            hd.PresentationLUTShapeValues.INVERSE if source.get("PhotometricInterpretation") == "MONOCHROME1"
            else hd.PresentationLUTShapeValues.IDENTITY)),
    )
    ds.SeriesDescription = producer.description("hot regions GSPS", method)
    mark_equipment(ds, producer)
    return ds

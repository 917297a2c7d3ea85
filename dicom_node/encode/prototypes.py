"""A prototype network's explanations as DICOM: an SC overlay and a TID 1410 group per prototype.

For each explained finding of a frame, each of its top prototypes gets
- a Secondary Capture in the overlays' series of the method ``prototypes``, made like the heatmap
  overlays (:func:`dicom_node.encode.overlay.capture`: same header, banner rules, Source Image
  reference): the source with the prototype's similarity map and most similar region beside the
  training patch the prototype stands for (:mod:`dicom_node.encode.prototype_overlay`). One
  picture per prototype keeps the source image at its own resolution, as readable as the other
  overlays; a mosaic of several would shrink it;
- a measurement group in the report: the finding's code, the similarity (DN330, NUM, unit "1"),
  the class connection weight (DN331), the location of the best match as an SCOORD POINT on the
  source image (at group level, what OHIF draws), the prototype's identity (DN332 index, DN333
  training phantom seed, DN334 training patch, as TEXT), whether that patch shows the finding
  (DN335, Yes/No) and the SC as "Illustration of ROI".
"""

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from dicom_node.encode.common import (
    DISCLAIMER_TEXT,
    METHOD_NAMES,
    NO,
    PROTOTYPE_CODES,
    UNITLESS,
    YES,
    Producer,
    mark_derived,
)
from dicom_node.encode.header import multi_frame
from dicom_node.encode.layout import Layout
from dicom_node.encode.overlay import capture, source_display
from dicom_node.encode.prototype_overlay import prototype_picture
from dicom_node.encode.study import clean_source
from dicom_node.explain.prototypes import (
    PROTOTYPE_METHODS,
    PrototypeEvidence,
    PrototypeExplanation,
    PrototypeIdentity,
    prototype_patch,
)

METHOD = PROTOTYPE_METHODS[0]
ILLUSTRATION = hd.sr.CodedConcept("121200", "DCM", "Illustration of ROI")
Group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
PrototypeKey = tuple[str, int, str, int]  # (source SOP Instance UID, frame, label, prototype)


def keys(explanations: Sequence[PrototypeExplanation]) -> list[PrototypeKey]:
    """The key of each prototype's overlay, in the order :func:`prototype_overlays` makes them."""
    return [(x.sop_instance_uid, x.frame, x.label, e.identity.prototype)
            for x in explanations for e in x.evidence]


def prototype_overlays(by_uid: Mapping[str, Dataset], explanations: Sequence[PrototypeExplanation],
                       producer: Producer, first_number: int = 1) -> list[Dataset]:
    """One SC per prototype of each explanation, numbered from ``first_number``."""
    displays: dict[tuple[str, int], np.ndarray] = {}
    patches: dict[int, np.ndarray] = {}
    overlays: list[Dataset] = []
    for explanation in explanations:
        source = by_uid[explanation.sop_instance_uid]
        frame = (explanation.sop_instance_uid, explanation.frame)
        if frame not in displays:
            displays[frame] = source_display(source, explanation.frame)
        for evidence in explanation.evidence:
            identity = evidence.identity
            if identity.prototype not in patches:
                patches[identity.prototype] = prototype_patch(identity)
            overlays.append(prototype_capture(source, explanation, evidence, patches[identity.prototype],
                                              producer, first_number + len(overlays), displays[frame]))
    return overlays


def prototype_capture(source: Dataset, explanation: PrototypeExplanation, evidence: PrototypeEvidence,
                      patch: np.ndarray, producer: Producer, instance_number: int,
                      display: np.ndarray) -> Dataset:
    """The SC of one prototype of ``explanation`` on ``source``; Pixel Spacing is left out, since
    the source image and the training patch beside it have different scales."""
    source = clean_source(source)
    pixels, layout, factor = prototype_picture(display, evidence, patch, explanation.model,
                                               explanation.model_version, explanation.notes)
    identity = evidence.identity
    ds = capture(source, pixels, producer, METHOD, explanation.frame,
                 (explanation.label, str(identity.prototype)), instance_number, None)
    ds.SeriesDescription = producer.description("overlay", METHOD)
    ds.ImageComments = (f"{DISCLAIMER_TEXT}. Prototype {identity.prototype} of {explanation.label}, "
                        f"similarity {evidence.similarity:.3f}, p={explanation.probability:.3f}")
    mark_derived(ds, [source], producer, f"{METHOD_NAMES[METHOD]}: similarity map of prototype "
                 f"{identity.prototype} of '{explanation.label}' blended over the source image, the most "
                 f"similar region boxed, beside the training patch the prototype stands for "
                 f"({_training(identity)}). {_describe(layout, display.shape[:2], factor)}")
    return ds


def _training(identity: PrototypeIdentity) -> str:
    x0, y0, x1, y1 = identity.box_source
    shows = "shows" if identity.shows_finding else "does not show"
    return (f"chest phantom seed {identity.seed} at {identity.render_size} px, patch x {x0}-{x1 - 1}, "
            f"y {y0}-{y1 - 1}; the patch {shows} the finding")


def _describe(layout: Layout, shape: tuple[int, ...], factor: int) -> str:
    rows, columns = layout.image_slices
    image_columns = shape[1] * factor
    scaled = (f", scaled up x{factor} (nearest neighbour)" if factor > 1 else ", at native resolution")
    return (f"Rows 1-{layout.top}: annotation band (notice, model, prototype, colour scale), outside the "
            f"images; source image at rows {rows.start + 1}-{rows.start + shape[0] * factor}, columns "
            f"{columns.start + 1}-{columns.start + image_columns}{scaled}; the training patch right of it, "
            f"to column {columns.stop}, scaled to the image's height")


def _source_frames(source: Dataset, frame: int) -> list[int] | None:
    return [frame + 1] if multi_frame(source) else None


def prototype_groups(by_uid: Mapping[str, Dataset], explanations: Sequence[PrototypeExplanation],
                     producer: Producer, algorithm_id: hd.sr.AlgorithmIdentification,
                     overlays: Mapping[PrototypeKey, Dataset]) -> list[Group]:
    """One TID 1410 group per prototype of each explanation (see the module's description)."""
    return [_group(clean_source(by_uid[x.sop_instance_uid]), x, e, producer, algorithm_id, overlays)
            for x in explanations for e in x.evidence]


def _group(source: Dataset, explanation: PrototypeExplanation, evidence: PrototypeEvidence,
           producer: Producer, algorithm_id: hd.sr.AlgorithmIdentification,
           overlays: Mapping[PrototypeKey, Dataset]) -> Group:
    sop, frames = str(source.SOPInstanceUID), _source_frames(source, explanation.frame)
    identity, label = evidence.identity, explanation.label
    finding = producer.label_code(label)
    tracking = hd.sr.TrackingIdentifier(
        uid=producer.instance_uid("tracking", source, sop, str(explanation.frame), label, METHOD,
                                  str(identity.prototype)),
        identifier=f"{label}, prototype {identity.prototype}, instance {source.get('InstanceNumber', '')} "
                   f"frame {explanation.frame + 1}")
    image = hd.sr.SourceImageForMeasurement(source.SOPClassUID, sop, frames)
    measurements = [
        hd.sr.Measurement(name=PROTOTYPE_CODES["similarity"], value=round(evidence.similarity, 6),
                          unit=UNITLESS, algorithm_id=algorithm_id, referenced_images=[image]),
        hd.sr.Measurement(name=PROTOTYPE_CODES["weight"], value=round(evidence.weight, 6), unit=UNITLESS,
                          algorithm_id=algorithm_id),
    ]
    # no Present/Absent here: the finding is stated once, in its own group or evaluation (a
    # consumer counting "Nodule: Present" must not count each prototype as one more nodule)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=finding, algorithm_id=algorithm_id,
        measurements=measurements, qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(PROTOTYPE_CODES["shows_finding"],
                                        YES if identity.shows_finding else NO)],
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POINT, graphic_data=np.array([evidence.peak_source]),
            source_image=hd.sr.SourceImageForRegion(source.SOPClassUID, sop, frames)))
    x0, y0, x1, y1 = identity.box_source
    group[0].ContentSequence.extend([
        hd.sr.TextContentItem(PROTOTYPE_CODES["prototype"], str(identity.prototype),
                              relationship_type="CONTAINS"),
        hd.sr.TextContentItem(PROTOTYPE_CODES["seed"], str(identity.seed), relationship_type="CONTAINS"),
        hd.sr.TextContentItem(PROTOTYPE_CODES["box"], f"{x0},{y0},{x1},{y1} (x0,y0,x1,y1 in pixels, end "
                              f"exclusive, of the phantom rendered at {identity.render_size} px)",
                              relationship_type="CONTAINS"),
    ])
    overlay = overlays.get((sop, explanation.frame, label, identity.prototype))
    if overlay is not None:
        group[0].ContentSequence.append(hd.sr.ImageContentItem(
            ILLUSTRATION, overlay.SOPClassUID, overlay.SOPInstanceUID, relationship_type="CONTAINS"))
    return group

"""What every object the node creates shares: identity, provenance, deterministic UIDs and codes.

Every output names its model and version, is marked AI-generated and unverified, and references
its source images (PS3.3 C.7.6.1.1.3 Derivation Description, Source Image Sequence). Its Series
and SOP Instance UIDs are 2.25 UIDs from a UUID5 of the inputs (the source's study and series
together), the model version and the method, so a re-run of the same job replaces its earlier
results instead of adding copies.
"""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.uid import UID
from pydicom.valuerep import DA, TM

from dicom_node import MANUFACTURER, __version__
from dicom_node.inference.manifest import ModelManifest
from dicom_node.store.patient import differing_identity

#: Burned into every overlay; attributes carry the ASCII form (no character set needed).
DISCLAIMER = "AI-GENERATED · UNVERIFIED · NOT FOR DIAGNOSTIC USE"
DISCLAIMER_TEXT = DISCLAIMER.replace(" · ", " - ")
#: Namespace of every UID the node derives.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-node:derived")

#: Our coding scheme, used only where no standard code exists (listed in docs/conformance.md).
SCHEME = "99DCMNODE"
UNITLESS = CodedConcept("1", "UCUM", "no units")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
METHOD_CODES = {  # DCM CID 7203 "Image Derivation" has codes for the kinds of visual explanation
    "gradcam": CodedConcept("130403", "DCM", "Gradient-weighted class activation"),
    "gradcampp": CodedConcept("130403", "DCM", "Gradient-weighted class activation"),
    "hirescam": CodedConcept("130403", "DCM", "Gradient-weighted class activation"),
    "lime": CodedConcept("130404", "DCM", "Saliency"),
    "cam": CodedConcept("130402", "DCM", "Class activation"),
    "seggradcam": CodedConcept("130403", "DCM", "Gradient-weighted class activation"),
    "attention": CodedConcept("130404", "DCM", "Saliency"),
}
METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "hirescam": "HiResCAM", "lime": "LIME",
                "cam": "CAM", "seggradcam": "Seg-Grad-CAM", "attention": "Attention gate",
                "prototypes": "Prototypes"}
#: Quality figures of an explanation (dicom_node.explain.quality): no standard codes exist.
QUALITY_CODES = {
    "deletion_auc": CodedConcept("DN001", SCHEME, "Deletion AUC"),
    "insertion_auc": CodedConcept("DN002", SCHEME, "Insertion AUC"),
    "deletion_auc_random": CodedConcept("DN003", SCHEME, "Deletion AUC of a random map"),
    "insertion_auc_random": CodedConcept("DN004", SCHEME, "Insertion AUC of a random map"),
    "deletion_auc_edges": CodedConcept("DN005", SCHEME, "Deletion AUC of an edge map"),
    "insertion_auc_edges": CodedConcept("DN006", SCHEME, "Insertion AUC of an edge map"),
    "stability": CodedConcept("DN007", SCHEME, "Explanation stability"),
    "sparseness": CodedConcept("DN008", SCHEME, "Explanation sparseness"),
    "rank_agreement_gradcam": CodedConcept("DN009", SCHEME, "Rank agreement with Grad-CAM"),
    "deletion_auc_centre": CodedConcept("DN301", SCHEME, "Deletion AUC of a centre map"),
    "insertion_auc_centre": CodedConcept("DN302", SCHEME, "Insertion AUC of a centre map"),
    "deletion_auc_randomised_model": CodedConcept("DN303", SCHEME, "Deletion AUC, randomised model's map"),
    "insertion_auc_randomised_model": CodedConcept("DN304", SCHEME, "Insertion AUC, randomised model's map"),
    "stability_edges": CodedConcept("DN305", SCHEME, "Stability of an edge map"),
    "lime_r2": CodedConcept("DN306", SCHEME, "LIME surrogate weighted R2"),
}
#: The verdict on one explanation (dicom_node.explain.quality.Verdict), a coded qualitative evaluation.
FAITHFULNESS = CodedConcept("DN310", SCHEME, "Explanation faithfulness")
VERDICT_CODES = {
    "faithful": CodedConcept("DN311", SCHEME, "Faithful"),
    "not shown to be faithful": CodedConcept("DN312", SCHEME, "Not shown to be faithful"),
}
#: A prototype network's explanation of a finding: per prototype, its similarity and identity.
PROTOTYPE_CODES = {
    "similarity": CodedConcept("DN330", SCHEME, "Prototype similarity"),
    "weight": CodedConcept("DN331", SCHEME, "Prototype class connection weight"),
    "prototype": CodedConcept("DN332", SCHEME, "Prototype index"),
    "seed": CodedConcept("DN333", SCHEME, "Prototype training phantom seed"),
    "box": CodedConcept("DN334", SCHEME, "Prototype training patch"),
    "shows_finding": CodedConcept("DN335", SCHEME, "Prototype patch shows the finding"),
}
#: A segmentation model's count of a label's lesions (connected pieces of its mask).
LESIONS = CodedConcept("DN340", SCHEME, "Number of lesions")
YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")
DERIVATION = CodedConcept("121401", "DCM", "Derivation")
#: Why the node is in every output's Contributing Equipment Sequence (PS3.16 CID 7005): it made
#: new instances from the sources. "Modifying Equipment" (109103) is for equipment that changed
#: existing instances without creating new ones, which the node never does.
PROCESSING_EQUIPMENT = CodedConcept("109102", "DCM", "Processing Equipment")
#: The Series Number block of each kind of output; the method's position is added for SC, SEG,
#: PM and GSPS, so each (pipeline, method) series is told apart in a viewer's series list.
SERIES_NUMBERS = {"sc": 9100, "sr": 9200, "seg": 9300, "pm": 9400, "gsps": 9500, "not_analysed": 9900}


def derived_uid(*parts: str) -> UID:
    """A 2.25 UID from a UUID5 of ``parts``: the same parts always give the same UID."""
    return UID(f"2.25.{uuid.uuid5(NAMESPACE, '/'.join(parts)).int}")


def source_series(source: "Dataset | tuple[str, str]") -> tuple[str, str]:
    """The source's series as output UIDs derive from it: its Study AND Series Instance UIDs, so
    that two studies sharing a Series Instance UID never get the same output UIDs. ``source`` is
    a data set of the series or the pair of UIDs itself (a report made without readable sources)."""
    if isinstance(source, tuple):
        study, series = source
        return str(study), str(series)
    return str(source.StudyInstanceUID), str(source.SeriesInstanceUID)


def check_one_series(sources: Sequence[Dataset]) -> None:
    """Raise ValueError unless every source is of one study, one series and one patient: results
    made from several would file one study's (one patient's) findings and images in another's.
    The message names the differing patient attributes, never their values."""
    found = sorted({source_series(ds) for ds in sources})
    if len(found) > 1:
        raise ValueError(f"sources: {len(found)} (study, series) pairs, expected one: {found}")
    differing = differing_identity(sources)
    if differing:
        raise ValueError(f"sources: several patients in one series ({', '.join(differing)} differ), "
                         "expected one")


@dataclass(frozen=True)
class Producer:
    """Who made an output: the node (a device), the pipeline and the model.

    Parameters
    ----------
    pipeline
        The pipeline's name from the config.
    manifest
        The model's manifest: name, version, weights sha256, label codes and thresholds.
    station
        The node's AE title, used as Station Name and as the device observer's name.
    institution
        The node's Institution Name (``node.institution_name``); "" leaves it out.
    device
        The installation's Device UID (``store.device``); "" derives one from the AE title
        (``dicom-node explain``, tests), which two installations may share.
    """

    pipeline: str
    manifest: ModelManifest
    station: str
    institution: str = ""
    device: str = ""

    @property
    def device_uid(self) -> UID:
        """The node as an SR device observer and as contributing equipment."""
        return UID(self.device) if self.device else derived_uid("device", self.station)

    @property
    def manufacturer(self) -> str:
        return MANUFACTURER

    @property
    def model_name(self) -> str:
        return f"{self.manifest.name} {self.manifest.version}"

    @property
    def software_versions(self) -> str:
        return f"dicom-node {__version__}"

    def series_uid(self, kind: str, source: "Dataset | tuple[str, str]", method: str = "") -> UID:
        """The Series Instance UID of the ``kind`` outputs made from ``source``'s series."""
        return derived_uid(kind, *source_series(source), self.pipeline, self.manifest.name,
                           self.manifest.version, self.manifest.sha256, method)

    def instance_uid(self, kind: str, source: "Dataset | tuple[str, str]", *parts: str) -> UID:
        """A UID (SOP Instance, Tracking) of an output made from ``source``'s series and ``parts``."""
        return derived_uid(kind, *source_series(source), self.pipeline, self.manifest.name,
                           self.manifest.version, self.manifest.sha256, *parts)

    def series_number(self, kind: str, method: str = "") -> int:
        methods = list(METHOD_NAMES)
        return SERIES_NUMBERS[kind] + (methods.index(method) + 1 if method in methods else 0)

    def label_code(self, label: str) -> CodedConcept:
        """The finding's code from the manifest, or one of ours when the manifest has none."""
        spec = next(item for item in self.manifest.labels if item.name == label)
        if spec.code is not None:
            return CodedConcept(spec.code[1], spec.code[0], spec.code[2])
        return CodedConcept(f"L-{label}"[:16], SCHEME, label)

    def threshold(self, label: str) -> float:
        return next(item.threshold for item in self.manifest.labels if item.name == label)

    def description(self, what: str, method: str = "") -> str:
        """A Series Description a radiologist reads in the series list (at most 64 characters)."""
        method_name = f" {METHOD_NAMES.get(method, method)}" if method else ""
        return f"AI {what}{method_name} {self.manifest.name} {self.manifest.version}"[:64]


def mark_derived(ds: Dataset, sources: Sequence[Dataset], producer: Producer, description: str) -> None:
    """Provenance every output carries: the AI-generated notice, the model, the source images.

    Sets Manufacturer (the node; series with it are never routed again), the model as
    Manufacturer's Model Name, Software Versions, Station Name, Derivation Description and the
    Source Image Sequence (PS3.3 C.7.6.1.1.3). Callers set the object-specific attributes.
    """
    if "SpecificCharacterSet" in sources[0]:  # patient names copied from the source need it
        ds.SpecificCharacterSet = sources[0].SpecificCharacterSet
    mark_equipment(ds, producer)
    ds.DerivationDescription = (
        f"{DISCLAIMER_TEXT}. {description}. Model {producer.model_name} (weights sha256 "
        f"{producer.manifest.sha256[:16]}), pipeline {producer.pipeline}."
    )[:1024]
    if "SourceImageSequence" not in ds:
        ds.SourceImageSequence = [source_reference(source) for source in sources]


def mark_equipment(ds: Dataset, producer: Producer) -> None:
    """The node as the output's equipment: General Equipment (Manufacturer, the model as
    Manufacturer's Model Name, Software Versions, Station Name, Institution Name) and its item in
    the Contributing Equipment Sequence (0018,A001), after the items highdicom put there (the
    source's acquisition equipment, highdicom itself). Every encoder calls it once its object's
    content date is set; calling it again replaces the node's item rather than adding one.

    Only an item of this node and model (same Device UID, Manufacturer's Model Name and Software
    Versions) is replaced: when the source is itself an output of a dicom-node, the items that
    name that node stay.
    """
    ds.Manufacturer = producer.manufacturer
    ds.ManufacturerModelName = producer.model_name[:64]
    ds.SoftwareVersions = producer.software_versions
    ds.StationName = producer.station[:16]
    if producer.institution:
        ds.InstitutionName = producer.institution[:64]
    ours = contributing_equipment(producer, created(ds))
    others = [item for item in ds.get("ContributingEquipmentSequence", []) if not _same_equipment(item, ours)]
    ds.ContributingEquipmentSequence = [*others, ours]


def _same_equipment(item: Dataset, ours: Dataset) -> bool:
    keys = ("DeviceUID", "ManufacturerModelName", "SoftwareVersions")
    return all(item.get(key) == ours.get(key) for key in keys)


def contributing_equipment(producer: Producer, when: datetime) -> Dataset:
    """The node's Contributing Equipment item (PS3.3 C.12.1, Table C.12-1): the node and the
    model that made the output, when, and that it is unverified AI output.

    One item for both, like the output's General Equipment attributes: Manufacturer is the
    node's, Manufacturer's Model Name the model and its version, Software Versions the node's and
    the model's, Device UID the one the SR's device observer carries.
    """
    manifest = producer.manifest
    item = hd.ContributingEquipment(
        manufacturer=producer.manufacturer, purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=producer.model_name[:64],
        software_versions=[producer.software_versions[:64], f"{manifest.name} {manifest.version}"[:64]],
        institution_name=producer.institution[:64] or None, station_name=producer.station[:16],
        contribution_datetime=when,
        contribution_description=(f"{DISCLAIMER_TEXT}. Analysed by model {producer.model_name} (weights "
                                  f"sha256 {manifest.sha256[:16]}), pipeline {producer.pipeline}.")[:1024],
    )
    item.DeviceUID = producer.device_uid
    return item


_CREATION = (("ContentDate", "ContentTime"), ("PresentationCreationDate", "PresentationCreationTime"))


def created(ds: Dataset) -> datetime:
    """When ``ds`` was made: its Content (or Presentation Creation) Date and Time, else now."""
    for date, time in _CREATION:
        try:
            return datetime.combine(DA(str(ds[date].value)), TM(str(ds[time].value)))
        except (KeyError, TypeError, ValueError):
            continue
    return datetime.now()


def source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item

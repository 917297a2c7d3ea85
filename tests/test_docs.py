"""The documents users read say what the code does."""

import dataclasses
from pathlib import Path

from pynetdicom import AllStoragePresentationContexts

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.config import Destination, Pipeline, Settings
from dicom_node.ingest.scp import TRANSFER_SYNTAXES
from dicom_node.ingest.status import StoreStatus

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_conformance_statement_matches_the_scp() -> None:
    text = (DOCS / "conformance.md").read_text()
    assert IMPLEMENTATION_CLASS_UID in text and IMPLEMENTATION_VERSION_NAME in text
    for syntax in TRANSFER_SYNTAXES:
        assert f"| {syntax} |" in text, syntax.name
    for context in AllStoragePresentationContexts:
        assert f"| {context.abstract_syntax} |" in text
    for status in StoreStatus:
        assert f"0x{status:04X}" in text, status.name


def test_every_setting_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for section in dataclasses.fields(Settings):
        if section.name == "source":
            continue
        arrays = ("destinations", "pipelines")
        heading = f"[[{section.name}]]" if section.name in arrays else f"[{section.name}]"
        assert f"## `{heading}`" in text, heading
        cls = {"destinations": Destination, "pipelines": Pipeline}.get(section.name, section.type)
        assert isinstance(cls, type) and dataclasses.is_dataclass(cls)
        for key in dataclasses.fields(cls):
            assert f"| `{key.name}` |" in text, f"{section.name}.{key.name}"


def test_conformance_statement_lists_every_created_object() -> None:
    from tests.encode.test_objects import SOP_CLASSES

    text = (DOCS / "conformance.md").read_text()
    for kind, uid in SOP_CLASSES.items():
        assert f"| `{kind}` |" in text and f"| {uid} |" in text, kind
    from dicom_node.encode.common import QUALITY_CODES

    for code in QUALITY_CODES.values():
        assert f"| {code.value} | 99DCMNODE | {code.meaning} |" in text, code.meaning


def test_the_readme_orthanc_config_and_the_default_node_config_point_at_each_other() -> None:
    import json

    from dicom_node.config import load_settings

    repo = DOCS.parent
    orthanc = json.loads((repo / "config" / "orthanc.json").read_text())
    settings = load_settings(repo / "config" / "node.toml")
    aet, host, port = orthanc["DicomModalities"]["xai"]
    assert (aet, port) == (settings.node.ae_title, settings.node.port) and host == "127.0.0.1"
    [pacs] = [d for d in settings.destinations if d.name == "pacs"]
    assert (pacs.ae_title, pacs.port) == (orthanc["DicomAet"], orthanc["DicomPort"])
    assert "config/orthanc.json" in (repo / "README.md").read_text()


def test_the_medical_cnn_section_matches_small_cnn(tmp_path: Path) -> None:
    """docs/models.md's MedicalCNN manifest loads, and its key table is small_cnn's state dict."""
    import re

    import torch

    from dicom_node.inference.architectures import SmallCNN
    from dicom_node.inference.manifest import load_manifest
    from dicom_node.inference.registry import sha256_of

    text = (DOCS / "models.md").read_text()
    section = text.split("### The founding article's `MedicalCNN`: `small_cnn`")[1].split("\n### ")[0]
    example = section.split("```toml\n")[1].split("```")[0]
    folder = tmp_path / "medical-cnn"
    folder.mkdir()
    torch.save(SmallCNN(4).state_dict(), folder / "weights.pt")
    example = example.replace("…64 hex digits…", sha256_of(folder / "weights.pt"))
    (folder / "model.toml").write_text(example)
    manifest = load_manifest(folder / "model.toml")
    assert manifest.architecture == "small_cnn" and len(manifest.labels) == 4
    documented = set()
    for cell in re.findall(r"^\| (`[^|]+`) \|", section, flags=re.MULTILINE):
        names = [name.strip("`") for name in cell.split(", ")]
        stem = names[0].rsplit(".", 1)[0]
        for name in names:
            full = name if name.startswith("features") or name.startswith("classifier") else stem + name
            if full.endswith(".*"):
                full = full[:-2]
                documented |= {f"{full}.{leaf}" for leaf in
                               ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
            else:
                documented.add(full)
    assert documented == set(SmallCNN(4).state_dict())


def test_each_private_code_value_means_one_thing() -> None:
    """A 99DCMNODE code value is never given two meanings (the SR would then say two things at once)."""
    import importlib
    import pkgutil

    from highdicom.sr import CodedConcept

    import dicom_node.encode

    meanings: dict[str, set[str]] = {}

    def collect(value: object) -> None:
        if isinstance(value, CodedConcept) and value.scheme_designator == "99DCMNODE":
            meanings.setdefault(value.value, set()).add(value.meaning)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    for module in pkgutil.iter_modules(dicom_node.encode.__path__):
        for value in vars(importlib.import_module(f"dicom_node.encode.{module.name}")).values():
            collect(value)
    assert len(meanings) > 20
    assert {code: names for code, names in meanings.items() if len(names) > 1} == {}

"""3D Slicer's readers (dcmqi: tid1500reader, segimage2itkimage, paramap2itkimage) parse every SR,
SEG and Parametric Map the node writes, and what they read back is what the node wrote: the
measurement groups and their tracking UIDs, the segments and their voxels, the map's values."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import Comprehensive3DSRStorage, ParametricMapStorage, SegmentationStorage

from dicom_node.encode import Producer, Revision, encode_results, not_analysed_report, report_reference
from tests.conftest import require_tool
from tests.encode.conftest import KINDS, make_case

METHODS = ("gradcam", "lime")
#: dcmqi needs Plane Orientation to place a segment; an image without a Frame of Reference
#: (CR, DX) has none, so Slicer cannot read the SEG of a radiograph (docs/conformance.md).
NO_GEOMETRY = ("CR", "DX")


def dcmqi(program: str) -> str:
    """Path of a dcmqi reader (the PyPI package installs them next to the interpreter)."""
    return require_tool(program, "dcmqi", also_in=Path(sys.executable).parent,
                        how="install the test extras (pip install dcmqi)")


def run(program: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmqi(program), *map(str, args)], capture_output=True, text=True, timeout=120,
                          check=False)


def read_nrrd(path: Path) -> np.ndarray:
    """The voxels of an NRRD file dcmqi wrote (attached, gzip or raw, little endian)."""
    header, _, data = path.read_bytes().partition(b"\n\n")
    fields = dict(line.split(": ", 1) for line in header.decode().splitlines()[1:] if ": " in line)
    dtype = {"short": "<i2", "float": "<f4", "unsigned char": "u1"}[fields["type"]]
    raw = gzip.decompress(data) if fields.get("encoding") == "gzip" else data
    sizes = [int(n) for n in fields["sizes"].split()]
    return np.frombuffer(raw, dtype=dtype).reshape(sizes[::-1])


def written(tmp_path: Path, kind: str, producer: Producer) -> tuple[list[Dataset], dict[str, Path]]:
    case = make_case(kind, producer, methods=METHODS)
    objects = encode_results([case.source], case.predictions, case.heatmaps, producer,
                             ("sc", "sr", "seg", "pm"), METHODS)
    paths = {}
    for ds in objects:
        paths[str(ds.SOPInstanceUID)] = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(paths[str(ds.SOPInstanceUID)], enforce_file_format=True)
    return objects, paths


@pytest.mark.parametrize("kind", KINDS)
def test_tid1500reader_reads_every_measurement_group(tmp_path: Path, producer: Producer, kind: str) -> None:
    objects, paths = written(tmp_path, kind, producer)
    [report] = [ds for ds in objects if ds.SOPClassUID == Comprehensive3DSRStorage]
    groups = hd.sr.srread(paths[str(report.SOPInstanceUID)]).content.get_planar_roi_measurement_groups()
    assert groups  # nodule and cardiomegaly are present and explained
    output = tmp_path / "sr.json"
    result = run("tid1500reader", "--inputDICOM", paths[str(report.SOPInstanceUID)], "--outputMetadata", output)
    assert result.returncode == 0, result.stdout + result.stderr
    read = json.loads(output.read_text())
    assert read["CompletionFlag"] == "COMPLETE"
    assert [m["TrackingUniqueIdentifier"] for m in read["Measurements"]] == [str(g.tracking_uid) for g in groups]
    assert [m["Finding"]["CodeMeaning"] for m in read["Measurements"]] == [g.finding_type.meaning for g in groups]
    for measurement in read["Measurements"]:
        quantities = [item["quantity"]["CodeMeaning"] for item in measurement["measurementItems"]]
        assert "Probability" in quantities and "Deletion AUC" in quantities


@pytest.mark.parametrize("kind", [k for k in KINDS if k[:2] not in NO_GEOMETRY])
def test_segimage2itkimage_reads_every_segment(tmp_path: Path, producer: Producer, kind: str) -> None:
    objects, paths = written(tmp_path, kind, producer)
    segs = [ds for ds in objects if ds.SOPClassUID == SegmentationStorage]
    assert len(segs) == len(METHODS)  # one per method: the present findings' hot regions
    for seg in segs:
        out = tmp_path / f"seg-{seg.SOPInstanceUID}"
        out.mkdir()
        result = run("segimage2itkimage", "--inputDICOM", paths[str(seg.SOPInstanceUID)], "--outputDirectory", out,
                     "--prefix", "seg")
        assert result.returncode == 0, result.stdout + result.stderr
        meta = json.loads((out / "seg-meta.json").read_text())
        read = [segment for group in meta["segmentAttributes"] for segment in group]
        assert [s["SegmentLabel"] for s in read] == [s.SegmentLabel for s in seg.SegmentSequence]
        frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
        for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
            number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
            voxels = read_nrrd(out / f"seg-{number}.nrrd")
            assert voxels.any() and np.array_equal(voxels[0] > 0, frame > 0), f"segment {number}"


@pytest.mark.parametrize("kind", NO_GEOMETRY)
def test_segimage2itkimage_cannot_place_a_radiograph_segment(tmp_path: Path, producer: Producer,
                                                             kind: str) -> None:
    """The documented limit: if a later dcmqi reads these, docs/conformance.md must say so."""
    objects, paths = written(tmp_path, kind, producer)
    [seg, *_] = [ds for ds in objects if ds.SOPClassUID == SegmentationStorage]
    result = run("segimage2itkimage", "--inputDICOM", paths[str(seg.SOPInstanceUID)], "--outputDirectory",
                 tmp_path)
    assert result.returncode != 0 and "Plane Orientation" in result.stdout + result.stderr


@pytest.mark.parametrize("kind", [k for k in KINDS if k[:2] not in NO_GEOMETRY])
def test_paramap2itkimage_reads_every_map(tmp_path: Path, producer: Producer, kind: str) -> None:
    objects, paths = written(tmp_path, kind, producer)
    maps = [ds for ds in objects if ds.SOPClassUID == ParametricMapStorage]
    assert len(maps) == 2 * len(METHODS)  # two explained labels per method
    for pmap in maps:
        out = tmp_path / f"pm-{pmap.SOPInstanceUID}"
        out.mkdir()
        result = run("paramap2itkimage", "--inputDICOM", paths[str(pmap.SOPInstanceUID)], "--outputDirectory", out)
        assert result.returncode == 0, result.stdout + result.stderr
        meta = json.loads((out / "meta.json").read_text())
        mapping = pmap.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
        assert meta["QuantityValueCode"]["CodeValue"] == quantity.CodeValue
        assert meta["SeriesDescription"] == pmap.SeriesDescription
        voxels = read_nrrd(out / "pmap.nrrd")
        assert voxels.shape == (1, pmap.Rows, pmap.Columns)
        np.testing.assert_allclose(voxels[0], pmap.pixel_array, rtol=0, atol=1e-6)
        assert np.ptp(voxels) > 0


def test_tid1500reader_reads_the_not_analysed_and_the_superseding_reports(tmp_path: Path,
                                                                          producer: Producer) -> None:
    case = make_case("CR", producer)
    reason = "photometric interpretation 'YBR_FULL' is not supported"
    older = encode_results([case.source], case.predictions, [], producer, ("sr",), [])[0]
    revision = Revision(2, (report_reference(older.StudyInstanceUID, older.SeriesInstanceUID, older.SOPClassUID,
                                             older.SOPInstanceUID),), replaces=1)
    newer = encode_results([case.source], case.predictions, case.heatmaps, producer, ("sr",), ["gradcam"],
                           revision)[0]
    for ds, groups in ((not_analysed_report([case.source], reason, producer), 1), (newer, 2)):
        path, output = tmp_path / f"{ds.SOPInstanceUID}.dcm", tmp_path / f"{ds.SOPInstanceUID}.json"
        ds.save_as(path, enforce_file_format=True)
        result = run("tid1500reader", "--inputDICOM", path, "--outputMetadata", output)
        assert result.returncode == 0, result.stdout + result.stderr
        read = json.loads(output.read_text())
        assert len(read["Measurements"]) == groups and read["SeriesDescription"] == ds.SeriesDescription

"""Segmentation models in the pipeline: an MR series becomes a volume, an attention U-Net segments
it, and the SEG (on the source frames), the SC overlays of its explanations and the SR with the
lesion's volume come back; a series that is not a volume gets the "not analysed" report."""

import dataclasses
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_node.config import Pipeline, Settings
from dicom_node.errors import PermanentError
from dicom_node.inference import InferenceRunner, ModelError, ModelRegistry, load_manifest
from dicom_node.inference.architectures import BUILDERS
from dicom_node.inference.registry import sha256_of
from dicom_node.inference.segment import lesion_volume_mm3, voxel_volume_mm3
from dicom_node.inference.volume import assemble
from dicom_node.pipeline import PipelineContext, default_steps, run
from dicom_node.store import InstanceStore
from tests.conftest import require_tool
from tests.encode.conftest import dciodvfy_errors
from tests.store.test_store import put
from tests.test_pipeline import job_of

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
GRID = (8, 32, 32)
NETWORK = {"spatial_dims": 3, "channels": (4, 8, 16), "strides": (2, 2)}


def _oblique() -> tuple[float, ...]:
    a, b = math.radians(20), math.radians(15)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    rotation = rz @ rx
    return (*rotation @ np.array(AXIAL[:3]), *rotation @ np.array(AXIAL[3:]))


def mr_series(orientation: tuple[float, ...] = AXIAL, slices: int = 10, size: int = 24,
              skip: int | None = None) -> list[Dataset]:
    """An MR series: a disc of 'brain' in every slice and a bright cube (the lesion) in slices
    3-6; ``skip`` leaves one slice out (a gap)."""
    normal = np.cross(orientation[:3], orientation[3:])
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    rows, columns = np.mgrid[:size, :size]
    disc = (rows - size / 2) ** 2 + (columns - size / 2) ** 2 < (size / 2 - 2) ** 2
    result = []
    for k in range(slices):
        if k == skip:
            continue
        pixels = np.where(disc, 400, 0).astype(np.uint16)
        if 3 <= k <= 6:
            pixels[8:15, 10:17] = 1500
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "PHANTOM^BRAIN", "PH-17", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "", ""
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.Modality, ds.BodyPartExamined, ds.Manufacturer = "MR", "BRAIN", "TestMaker"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 500, 15, 1, 1.5
        ds.SliceThickness, ds.PixelSpacing = 3.0, [0.9, 0.8]
        ds.ImagePositionPatient = [round(float(v), 6) for v in np.array([-10.0, -12.0, 40.0]) + 3.0 * k * normal]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = MRImageStorage, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        result.append(ds)
    return result


def write_segmentation_model(root: Path, threshold: float = 0.5, name: str = "brain") -> Path:
    """A tiny attention U-Net with seeded random weights and its manifest (one label, "lesion")."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(17)
    weights = folder / "weights.pt"
    torch.save(BUILDERS["attention_unet"](1, 1, **NETWORK).state_dict(), weights)
    manifest = folder / "model.toml"
    manifest.write_text(
        f'name = "{name}"\nversion = "0.1"\ntask = "segmentation"\narchitecture = "attention_unet"\n'
        f'weights = "weights.pt"\nsha256 = "{sha256_of(weights)}"\ncam_layer = "model.1.submodule.1.merge"\n'
        'intended_use = "tests only"\n'
        '[network]\nspatial_dims = 3\nchannels = [4, 8, 16]\nstrides = [2, 2]\n'
        f'[input]\nvolume = {list(GRID)}\nnormalization = "zscore_nonzero"\n'
        '[scope]\nmodalities = ["MR"]\n'
        f'[[labels]]\nname = "lesion"\nthreshold = {threshold}\ncode = ["SCT", "52988006", "Lesion"]\n')
    return manifest


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model, its lesion threshold set so that about 3% of the voxels of the axial series are
    found (random weights: the mask is whatever they make; the tests check it travels exactly)."""
    root = tmp_path_factory.mktemp("models")
    write_segmentation_model(root)
    runner = InferenceRunner(ModelRegistry(root), device="cpu")
    probabilities = runner.segment("brain", assemble(mr_series())).probabilities
    write_segmentation_model(root, round(float(np.quantile(probabilities, 0.97)), 6))
    return root


def _run(settings: Settings, store: InstanceStore, models: Path, series: list[Dataset],
         explain: tuple[str, ...] = ("attention", "seggradcam")) -> tuple[PipelineContext | None, list[Path]]:
    records = [put(store, ds) for ds in series]
    pipeline = Pipeline(name="brain", model="brain", explain=explain, outputs=("seg", "sc", "sr"))
    configured = dataclasses.replace(settings, pipelines=(pipeline,))
    runner = InferenceRunner(ModelRegistry(models), device="cpu")
    ctx = None
    try:
        job = dataclasses.replace(job_of(records), pipeline="brain", model="brain")
        ctx = run(job, {}, settings=configured, store=store, steps=default_steps(), runner=runner)
    except PermanentError:
        pass
    return ctx, sorted((settings.node.data_dir / "results").rglob("*.dcm"))


def _check_seg(seg: Dataset, ctx: PipelineContext) -> None:
    """Every SEG frame is the pipeline's mask on the slice of the source instance it references,
    at that instance's position; the slices with lesion voxels are exactly the frames."""
    assert ctx.segmentation is not None
    volume, mask = ctx.segmentation.volume, ctx.segmentation.mask("lesion")
    read = hd.seg.Segmentation.from_dataset(seg)
    pixels = read.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    slice_of = {s.sop_instance_uid: k for k, s in enumerate(volume.sources)}
    seen = []
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = slice_of[uid]
        seen.append(k)
        position = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        np.testing.assert_allclose(position, volume.affine[:3, 3] + volume.affine[:3, 0] * k, atol=1e-3)
        np.testing.assert_array_equal(pixels[i].astype(bool), mask[k])
    assert sorted(seen) == [k for k in range(mask.shape[0]) if mask[k].any()]
    assert read.get_segment_description(1).segment_label.startswith("lesion")
    assert str(seg.FrameOfReferenceUID) == str(ctx.datasets[0].FrameOfReferenceUID)


def _sr_values(sr: Dataset) -> dict[str, float]:
    values: dict[str, float] = {}

    def walk(items: object) -> None:
        for item in items:  # type: ignore[attr-defined]
            if item.ValueType == "NUM":
                values[item.ConceptNameCodeSequence[0].CodeMeaning] = float(
                    item.MeasuredValueSequence[0].NumericValue)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return values


def _texts(sr: Dataset) -> list[str]:
    found: list[str] = []

    def walk(items: object) -> None:
        for item in items:  # type: ignore[attr-defined]
            if item.ValueType == "TEXT":
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


@pytest.mark.parametrize("orientation", [AXIAL, _oblique()], ids=["axial", "oblique"])
def test_a_series_gives_a_seg_on_the_source_frames_overlays_and_a_report_with_the_volume(
    store: InstanceStore, settings: Settings, models: Path, orientation: tuple[float, ...]
) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    ctx, paths = _run(settings, store, models, mr_series(orientation))
    assert ctx is not None and ctx.segmentation is not None
    mask = ctx.segmentation.mask("lesion")
    assert mask.any() and mask.shape == (10, 24, 24)
    written = {path: dcmread(path) for path in paths}
    kinds = [ds.Modality for ds in written.values()]
    assert kinds.count("SEG") == 1 and kinds.count("SR") == 1 and kinds.count("OT") >= 2
    seg = next(ds for ds in written.values() if ds.Modality == "SEG")
    _check_seg(seg, ctx)
    sr = next(ds for ds in written.values() if ds.Modality == "SR")
    values = _sr_values(sr)
    expected = int(mask.sum()) * abs(np.linalg.det(ctx.segmentation.volume.affine[:3, :3]))
    assert values["Volume"] == pytest.approx(expected, abs=1e-3)
    assert values["Volume"] == pytest.approx(lesion_volume_mm3(mask, ctx.segmentation.volume.affine), abs=1e-3)
    assert values["Diameter"] > 0
    text = str(sr)
    assert str(seg.SOPInstanceUID) in text  # TID 1411's referenced segment
    overlays = [ds for ds in written.values() if ds.Modality == "OT"]
    assert all(str(ds.SOPInstanceUID) in text for ds in overlays)  # illustrations of the ROI
    methods = {m.method for m in ctx.volume_maps}
    assert methods == {"attention", "seggradcam"}
    assert len({m.layer for m in ctx.volume_maps if m.method == "attention"}) == 2  # one map per gate
    for ds in overlays:
        assert ds.BurnedInAnnotation == "YES" and "UNVERIFIED" in ds.DerivationDescription.upper()
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in {s.SOPInstanceUID for s in ctx.datasets}
        assert ds.Rows > 24 and ds.Columns >= 24  # the band above the image
    assert len({ds.SOPInstanceUID for ds in overlays}) == len(overlays)
    for ds in written.values():
        assert "brain 0.1" in str(ds.get("ManufacturerModelName", "")) or ds.Modality == "SR"
        assert str(ds.StudyInstanceUID) == str(ctx.datasets[0].StudyInstanceUID)
    for path in paths:
        errors, output = dciodvfy_errors(dciodvfy, path)
        assert not errors, output


def test_the_maps_are_on_the_source_grid_and_seg_grad_cam_is_non_negative(
    store: InstanceStore, settings: Settings, models: Path
) -> None:
    ctx, _ = _run(settings, store, models, mr_series(), explain=("seggradcam",))
    assert ctx is not None and ctx.volume is not None
    assert [m.method for m in ctx.volume_maps] == ["seggradcam"]
    cam = ctx.volume_maps[0].array
    assert cam.shape == ctx.volume.array.shape and cam.min() >= 0 and cam.max() > 0


def test_a_series_with_a_gap_gets_the_not_analysed_report_naming_the_gap(
    store: InstanceStore, settings: Settings, models: Path
) -> None:
    ctx, paths = _run(settings, store, models, mr_series(skip=5))
    assert ctx is None
    assert [dcmread(p).Modality for p in paths] == ["SR"]
    text = " ".join(_texts(dcmread(paths[0])))
    assert "not one regular volume" in text and "gap: about 1 slice(s) missing" in text


def test_a_series_without_a_lesion_gets_a_report_saying_so(
    store: InstanceStore, settings: Settings, tmp_path: Path
) -> None:
    write_segmentation_model(tmp_path / "strict", threshold=0.999999)
    ctx, paths = _run(settings, store, tmp_path / "strict", mr_series())
    assert ctx is not None and ctx.segmentation is not None and not ctx.segmentation.found()
    written = [dcmread(p) for p in paths]
    assert [ds.Modality for ds in written] == ["SR"]
    text = str(written[0])
    assert "Lesion" in text and "Absent" in text and "Volume" not in text


def test_the_voxel_volume_is_the_determinant_of_the_affine() -> None:
    volume = assemble(mr_series(_oblique()))
    assert voxel_volume_mm3(volume.affine) == pytest.approx(0.9 * 0.8 * 3.0, rel=1e-4)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace('task = "segmentation"\n', ""), "key 'task'.*architecture 'attention_unet'"),
    (lambda t: t.replace("strides = [2, 2]", "strides = [2]"), "network.strides"),
    (lambda t: t.replace("volume = [8, 32, 32]", "volume = [8, 30, 32]"), "divisible by 4"),
    (lambda t: t.replace("[scope]", "[gate]\nthreshold = 1.0\n[scope]"), "no \\[gate\\] for a segmentation"),
    (lambda t: t.replace("[network]", "[network]\ndepth = 3"), "unknown key.*depth"),
])
def test_a_segmentation_manifest_is_checked(tmp_path: Path, edit: object, message: str) -> None:
    path = write_segmentation_model(tmp_path)
    path.write_text(edit(path.read_text()))  # type: ignore[operator]
    with pytest.raises(ModelError, match=message):
        load_manifest(path)


def test_weights_that_do_not_fit_the_network_are_refused(tmp_path: Path) -> None:
    path = write_segmentation_model(tmp_path)
    path.write_text(path.read_text().replace("channels = [4, 8, 16]", "channels = [4, 8, 32]"))
    with pytest.raises(ModelError, match="weights do not fit attention_unet"):
        ModelRegistry(tmp_path).verify()


def test_dicom_node_explain_segments_a_series_offline(tmp_path: Path, models: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main

    series = tmp_path / "series"
    series.mkdir()
    for k, ds in enumerate(mr_series()):
        ds.save_as(series / f"{k:02d}.dcm", enforce_file_format=True)
    config = tmp_path / "node.toml"
    config.write_text(f'[models]\ndir = "{models}"\n[[pipelines]]\nname = "brain"\nmodel = "brain"\n'
                      'match = { modality = ["MR"] }\nexplain = ["attention"]\noutputs = ["seg", "sc", "sr"]\n')
    assert main(["explain", str(series), "--out", str(tmp_path / "out"), "--config", str(config)]) == 0
    assert "analysed: lesion" in capsys.readouterr().out
    modalities = sorted(dcmread(p).Modality for p in (tmp_path / "out").rglob("*.dcm"))
    assert modalities[-2:] == ["SEG", "SR"] and modalities.count("OT") >= 2


def test_an_enhanced_multiframe_series_gets_a_seg_referencing_its_frames(models: Path) -> None:
    from dicom_node.encode import Producer, encode_volume
    from tests.inference.test_volume import _enhanced

    series = mr_series(_oblique())
    order = [int(i) for i in np.random.default_rng(5).permutation(len(series))]
    enhanced = _enhanced(series, order, per_frame_geometry=False)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "AccessionNumber", "ReferringPhysicianName", "StudyID", "FrameOfReferenceUID"):
        setattr(enhanced, keyword, series[0].get(keyword))
    enhanced.SeriesNumber, enhanced.ImageType = 2, ["ORIGINAL", "PRIMARY", "OTHER", "NONE"]
    runner = InferenceRunner(ModelRegistry(models), device="cpu")
    result = runner.segment("brain", assemble([enhanced]))
    assert result.found() == ["lesion"]
    producer = Producer("brain", runner.registry.manifest("brain"), "XAI_NODE")
    encoded = encode_volume([enhanced], result, [], producer, ("seg",), isolate=False)
    seg = encoded.objects[0]
    pixels = hd.seg.Segmentation.from_dataset(seg).pixel_array.reshape(int(seg.NumberOfFrames), 24, 24)
    slice_of = {s.frame: k for k, s in enumerate(result.volume.sources)}
    mask = result.mask("lesion")
    seen = []
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        k = slice_of[int(reference.ReferencedFrameNumber)]
        seen.append(k)
        np.testing.assert_array_equal(pixels[i].astype(bool), mask[k])
    assert sorted(seen) == [k for k in range(mask.shape[0]) if mask[k].any()]

"""Segmentation models in the pipeline: an MR series becomes a volume, an attention U-Net segments
it, and the SEG (on the source frames), the SC overlays of its explanations and the SR with the
lesion's volume come back; a series that is not a volume gets the "not analysed" report."""

import dataclasses
import math
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_node.audit import NO_AUDIT, Audit
from dicom_node.cli import format_job
from dicom_node.config import Pipeline, Settings
from dicom_node.errors import PermanentError
from dicom_node.inference import InferenceRunner, ModelError, ModelRegistry, load_manifest
from dicom_node.inference.architectures import BUILDERS
from dicom_node.inference.registry import sha256_of
from dicom_node.inference.segment import voxel_volume_mm3
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
         explain: tuple[str, ...] = ("attention", "seggradcam"), outputs: tuple[str, ...] = ("seg", "sc", "sr"),
         audit: Audit = NO_AUDIT) -> tuple[PipelineContext | None, list[Path]]:
    records = [put(store, ds) for ds in series]
    pipeline = Pipeline(name="brain", model="brain", explain=explain, outputs=outputs)
    configured = dataclasses.replace(settings, pipelines=(pipeline,))
    runner = InferenceRunner(ModelRegistry(models), device="cpu")
    ctx = None
    try:
        job = dataclasses.replace(job_of(records), pipeline="brain", model="brain")
        ctx = run(job, {}, settings=configured, store=store, steps=default_steps(), runner=runner, audit=audit)
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


def _check_overlay(ds: Dataset, ctx: PipelineContext) -> None:
    """The overlay as the classification overlays are: the band above the image holds the yellow
    notice, the image below it is the source slice scaled up by a whole factor, unchanged where
    the map adds no colour and still visible where it does."""
    from dicom_node.encode.overlay import DISCLAIMER_COLOUR, source_display

    factor = ds.Columns // 24
    top = ds.Rows - 24 * factor
    assert factor >= 1 and top > 0 and f"Rows 1-{top}: annotation band" in ds.DerivationDescription
    pixels = ds.pixel_array
    assert np.all(pixels[:top] == DISCLAIMER_COLOUR, axis=-1).any()  # the notice, in the band
    source = next(s for s in ctx.datasets if s.SOPInstanceUID == ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
    display = source_display(source, 0)
    image = pixels[top:][factor // 2::factor, factor // 2::factor]
    assert image.shape == display.shape
    assert ctx.segmentation is not None
    k = [s.sop_instance_uid for s in ctx.segmentation.volume.sources].index(source.SOPInstanceUID)
    item = next(m for m in ctx.volume_maps if f"(layer {m.layer})" in ds.DerivationDescription)
    shown = item.source_slice(k)
    top = 1.0 if item.method == "attention" else shown.max()  # attention: a fixed 0-1 colour scale
    untouched = shown <= top / 255  # where the blend adds no colour
    assert np.mean(np.all(image[untouched] == display[untouched], axis=-1)) > 0.95 if untouched.any() else True
    assert np.corrcoef(image.mean(axis=-1).ravel(), display[..., 0].ravel())[0, 1] > 0.3  # still visible


def _sr_values(sr: Dataset) -> dict[str, float]:
    """The report's numbers by concept name, "Volume (Total)" where a derivation qualifies it."""
    values: dict[str, float] = {}

    def walk(items: object) -> None:
        for item in items:  # type: ignore[attr-defined]
            if item.ValueType == "NUM":
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                derivation = [m.ConceptCodeSequence[0].CodeMeaning for m in item.get("ContentSequence", [])
                              if m.ConceptNameCodeSequence[0].CodeValue == "121401"]
                values[f"{name} ({derivation[0]})" if derivation else name] = float(
                    item.MeasuredValueSequence[0].NumericValue)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return values


def _measured_sources(sr: Dataset) -> list[str]:
    """The images of the first measurement group's Source of Measurement items (TID 1501)."""
    imaging = next(item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010")
    return [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in imaging.ContentSequence[0].ContentSequence
            if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "121112"]


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
    assert values["Volume (Total)"] == pytest.approx(int(mask.sum()) * 0.9 * 0.8 * 3.0, abs=1e-2)
    assert values["Diameter (Maximum)"] > 0
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
        _check_overlay(ds, ctx)
    assert len({ds.SOPInstanceUID for ds in overlays}) == len(overlays)
    for ds in written.values():
        assert "brain 0.1" in str(ds.get("ManufacturerModelName", "")) or ds.Modality == "SR"
        assert str(ds.StudyInstanceUID) == str(ctx.datasets[0].StudyInstanceUID)
    for path in paths:
        errors, output = dciodvfy_errors(dciodvfy, path)
        assert not errors, output


def test_the_maps_stay_on_the_model_grid_and_seg_grad_cam_is_non_negative(
    store: InstanceStore, settings: Settings, models: Path
) -> None:
    ctx, _ = _run(settings, store, models, mr_series(), explain=("seggradcam",))
    assert ctx is not None and ctx.volume is not None
    assert [m.method for m in ctx.volume_maps] == ["seggradcam"]
    cam = ctx.volume_maps[0]
    assert cam.array.shape == GRID and cam.array.min() >= 0 and cam.array.max() > 0
    assert cam.source_slice(4).shape == ctx.volume.array.shape[1:]


def test_a_series_with_a_gap_gets_the_not_analysed_report_naming_the_gap(
    store: InstanceStore, settings: Settings, models: Path
) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    ctx, paths = _run(settings, store, models, mr_series(skip=5))
    assert ctx is None
    assert [dcmread(p).Modality for p in paths] == ["SR"]
    text = " ".join(_texts(dcmread(paths[0])))
    assert "not one regular volume" in text and "gap: about 1 slice(s) missing" in text
    errors, output = dciodvfy_errors(dciodvfy, paths[0])
    assert not errors, output


def test_a_series_without_a_lesion_gets_a_report_saying_so(
    store: InstanceStore, settings: Settings, tmp_path: Path
) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    write_segmentation_model(tmp_path / "strict", threshold=0.999999)
    ctx, paths = _run(settings, store, tmp_path / "strict", mr_series())
    assert ctx is not None and ctx.segmentation is not None and not ctx.segmentation.found()
    written = [dcmread(p) for p in paths]
    assert [ds.Modality for ds in written] == ["SR"]
    text = str(written[0])
    assert "Lesion" in text and "Absent" in text and "Volume" not in text
    errors, output = dciodvfy_errors(dciodvfy, paths[0])
    assert not errors, output


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


def test_start_up_refuses_a_segmentation_pipeline_with_classification_methods_outputs_or_on_ray(
    settings: Settings, models: Path
) -> None:
    from dicom_node.errors import ConfigError
    from dicom_node.node import check_models

    registry = ModelRegistry(models)
    default = dataclasses.replace(settings, pipelines=(Pipeline(name="brain", model="brain"),))
    with pytest.raises(ConfigError, match=r"pipelines\[0\].explain' = \['gradcam'\] is invalid for segmentation"):
        check_models(default, registry)
    fitting = dataclasses.replace(default, pipelines=(Pipeline(name="brain", model="brain",
                                                                explain=("attention",)),))
    check_models(fitting, registry)
    on_ray = dataclasses.replace(fitting, workers=dataclasses.replace(fitting.workers, executor="ray"))
    with pytest.raises(ConfigError, match="segmentation model, which runs on the node's own workers"):
        check_models(on_ray, registry)
    for outputs, unmade in ((("seg", "pm", "sr"), "['pm']"), (("gsps", "sc", "pm"), "['gsps', 'pm']")):
        asking = dataclasses.replace(default, pipelines=(Pipeline(name="brain", model="brain", explain=("attention",),
                                                                  outputs=outputs),))
        with pytest.raises(ConfigError, match=re.escape(
                f"key 'pipelines[0].outputs' = {list(outputs)} of pipeline 'brain': segmentation model "
                f"'brain' makes no {unmade}; expected some of ['seg', 'sc', 'sr']")):
            check_models(asking, registry)


def test_models_verify_and_list_name_a_segmentation_model(tmp_path: Path, models: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main

    config = tmp_path / "node.toml"
    config.write_text(f'[models]\ndir = "{models}"\n[[pipelines]]\nname = "brain"\nmodel = "brain"\n'
                      'explain = ["attention", "seggradcam"]\noutputs = ["seg", "sc", "sr"]\n')
    assert main(["models", "verify", "--config", str(config)]) == 0
    assert "sanity brain 0.1: not run (a segmentation model" in capsys.readouterr().out
    assert main(["models", "list", "--config", str(config)]) == 0
    assert "attention_unet  input volume 8x32x32" in capsys.readouterr().out


@pytest.mark.parametrize("outputs", [("sc", "sr"), ("sr",)], ids=["sc+sr", "sr"])
def test_without_a_seg_the_report_still_goes_naming_the_lesion_slices(
    store: InstanceStore, settings: Settings, models: Path, outputs: tuple[str, ...]
) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    ctx, paths = _run(settings, store, models, mr_series(), outputs=outputs)
    assert ctx is not None and ctx.segmentation is not None and ctx.segmentation.found() == ["lesion"]
    written = [dcmread(p) for p in paths]
    assert sorted(ds.Modality for ds in written)[-1] == "SR" and "SEG" not in {ds.Modality for ds in written}
    assert ("OT" in {ds.Modality for ds in written}) == ("sc" in outputs)
    assert bool(ctx.volume_maps) == ("sc" in outputs)  # no overlay to show them on: not computed
    sr = next(ds for ds in written if ds.Modality == "SR")
    mask = ctx.segmentation.mask("lesion")
    assert _sr_values(sr)["Volume (Total)"] == pytest.approx(int(mask.sum()) * 0.9 * 0.8 * 3.0, abs=1e-2)
    with_lesion = [s.sop_instance_uid for k, s in enumerate(ctx.segmentation.volume.sources) if mask[k].any()]
    assert _measured_sources(sr) == with_lesion
    for path in paths:
        errors, output = dciodvfy_errors(dciodvfy, path)
        assert not errors, output


def test_a_failed_report_is_no_silent_success(store: InstanceStore, settings: Settings, models: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The SEG and overlays still go; the failed SR is an ERROR, an audit event and on the job's record."""
    from tests.test_pipeline_headers import Recorder

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no report")

    monkeypatch.setattr("dicom_node.encode.lesion_report", broken)
    audit = Recorder()
    ctx, paths = _run(settings, store, models, mr_series(), audit=audit)
    assert ctx is not None and "SR" not in {dcmread(p).Modality for p in paths}
    assert ctx.summary()["outputs_failed"] == [{"output": "sr", "error": "RuntimeError"}]
    assert [fields["output"] for event, fields in audit.events if event == "output_failed"] == ["sr"]
    shown = format_job(dataclasses.replace(ctx.job, results=ctx.summary()), [])
    assert "not made     sr (RuntimeError)" in shown and "explained    lesion by seggradcam at" in shown


@pytest.mark.parametrize("outputs", [("seg", "sr"), ("sr",)], ids=["with-seg", "without-seg"])
def test_the_report_gives_a_known_masks_lesions_total_volume_and_largest_lesion(
    models: Path, outputs: tuple[str, ...]
) -> None:
    """Two cuboids, 4 x 7 x 7 and 2 x 3 x 3 voxels of 3 x 0.9 x 0.8 mm: two lesions, 214 voxels in
    all; the largest lesion's diameter runs corner to corner between voxel centres."""
    from dicom_node.encode import Producer, encode_volume

    series = mr_series(_oblique())
    runner = InferenceRunner(ModelRegistry(models), device="cpu")
    result = runner.segment("brain", assemble(series))
    mask = np.zeros(result.masks.shape[1:], dtype=bool)
    mask[1:5, 2:9, 2:9] = True
    mask[7:9, 18:21, 18:21] = True
    known = dataclasses.replace(result, masks=mask[None])
    producer = Producer("brain", runner.registry.manifest("brain"), "XAI_NODE")
    encoded = encode_volume(series, known, [], producer, outputs, isolate=False)
    sr = next(ds for ds in encoded.objects if ds.Modality == "SR")
    values = _sr_values(sr)
    assert values["Volume (Total)"] == pytest.approx(214 * 0.9 * 0.8 * 3.0, abs=1e-3)
    assert values["Number of lesions"] == 2
    assert values["Volume (Maximum)"] == pytest.approx(196 * 0.9 * 0.8 * 3.0, abs=1e-3)
    assert values["Diameter (Maximum)"] == pytest.approx(math.sqrt(9.0**2 + 5.4**2 + 4.8**2), abs=1e-3)
    assert "Sum of segmented voxel volumes" in str(sr)
    if "seg" not in outputs:
        sources = [s.sop_instance_uid for k, s in enumerate(known.volume.sources) if k in (1, 2, 3, 4, 7, 8)]
        assert _measured_sources(sr) == sources  # the slices holding either lesion, no others


def test_a_map_whose_maximum_lies_outside_the_lesion_is_flagged() -> None:
    from dicom_node.encode.lesion import _peak_outside
    from dicom_node.explain.volume import VolumeMap
    from dicom_node.inference.volume import GridMap

    # the model grid is half the source grid on rows and columns: model (k, r, c) -> source (k, 2r + 0.5, 2c + 0.5)
    mapping = GridMap((4, 12, 12), (4, 6, 6), (1.0, 2.0, 2.0), (0.0, 0.5, 0.5), np.eye(4))
    mask = np.zeros((4, 12, 12), dtype=bool)
    mask[2, 6:9, 6:9] = True
    inside = np.zeros((4, 6, 6), dtype=np.float32)
    inside[2, 3, 3] = 1.0  # source (2, 6.5, 6.5): rounds into the lesion
    outside = inside.copy()
    outside[0, 0, 0] = 2.0
    assert not _peak_outside(VolumeMap("lesion", "seggradcam", "layer", inside, mapping), mask)
    assert _peak_outside(VolumeMap("lesion", "seggradcam", "layer", outside, mapping), mask)

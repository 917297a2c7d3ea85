"""Brain MR phantoms: seeded volumes with exact lesion masks, written as MR and Enhanced MR objects that
dciodvfy accepts and that volume assembly rebuilds voxel for voxel."""

import hashlib
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage
from scipy import ndimage

from dicom_node.inference.volume import assemble
from dicom_node.phantoms import brain as brain_module
from dicom_node.phantoms.__main__ import main
from dicom_node.phantoms.brain import (
    VOLUME_RANGE_CM3,
    BrainPhantom,
    Templates,
    load_templates,
    render_brain,
)
from dicom_node.phantoms.mr import enhanced_mr, mr_series, write_brain
from tests.conftest import require_tool
from tests.encode.conftest import dciodvfy_errors

FAST = {"spacing": 4.0, "slice_spacing": 4.0}  # 45 x 58 x 48 voxels: every check runs in milliseconds


def _same(a: BrainPhantom, b: BrainPhantom) -> bool:
    return all(np.array_equal(getattr(a, name), getattr(b, name))
               for name in ("pixels", "affine", "brain", "core", "lesion"))


def test_templates_load_from_the_installed_package_without_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the templates must not be fetched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    load_templates.cache_clear()
    templates = load_templates()
    assert templates.wm.shape == templates.gm.shape == templates.mask.shape == (197, 233, 189)
    assert not templates.mask.flags.writeable


def test_without_nilearn_the_error_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nilearn", None)
    load_templates.cache_clear()
    try:
        with pytest.raises(ImportError, match=re.escape("pip install '.[phantoms]'")):
            render_brain(0, **FAST)
    finally:
        load_templates.cache_clear()


def test_pixels_and_masks_of_a_seed_never_change() -> None:
    # datasets made from earlier versions must stay reproducible: any change to the pixels, the masks,
    # the lesion's placement or a random stream changes this digest
    ph = render_brain(2, lesion=True, **FAST)
    digest = hashlib.sha256()
    for array in (ph.pixels, ph.brain, ph.core, ph.lesion):
        digest.update(np.ascontiguousarray(array).tobytes())
    assert (ph.pixels.dtype, ph.pixels.shape) == (np.uint16, (45, 58, 48))
    assert digest.hexdigest() == "e3fa1e8b6ea054e8cf298a0df62647160105ad58145517841e5729e845f2e6c5"


def test_importing_the_phantoms_does_not_load_scipy_ndimage() -> None:
    code = "import sys, dicom_node.phantoms; sys.exit('scipy.ndimage' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _marked_templates(ras_mm: tuple[float, float, float]) -> Templates:
    """The templates with a bright sphere (radius 6 mm) of grey matter around ``ras_mm``."""
    plain = load_templates()
    centre = np.linalg.solve(plain.affine[:3, :3], np.array(ras_mm) - plain.affine[:3, 3])
    index = np.indices(plain.gm.shape, sparse=True)
    gm = np.array(plain.gm)
    gm[sum((axis - c) ** 2 for axis, c in zip(index, centre, strict=True)) <= 6.0**2] = 4.0
    return Templates(gm=gm, wm=plain.wm, mask=plain.mask, affine=plain.affine)


@pytest.mark.parametrize("oblique", [False, True])
def test_anatomy_lies_in_patient_coordinates_right_anterior_superior(
        monkeypatch: pytest.MonkeyPatch, oblique: bool) -> None:
    # a mark at MNI (RAS) +40, +20, +30 mm: 40 mm right, 20 mm anterior, 30 mm superior = LPS (-40, -20, 30)
    plain = render_brain(2, lesion=False, oblique=oblique, **FAST)
    marked_templates = _marked_templates((40.0, 20.0, 30.0))
    monkeypatch.setattr(brain_module, "load_templates", lambda: marked_templates)
    marked = render_brain(2, lesion=False, oblique=oblique, **FAST)
    gain = np.clip(marked.pixels.astype(np.float64) - plain.pixels, 0.0, None)  # same noise: only the mark
    assert gain.max() > 1000.0
    index = (np.argwhere(gain) * gain[gain > 0][:, None]).sum(axis=0) / gain.sum()
    world = marked.affine[:3, :3] @ index + marked.affine[:3, 3]
    assert world == pytest.approx([-40.0, -20.0, 30.0], abs=2.0)
    if not oblique:  # centre of the grid: MNI (0, -17, 10), so the mark is 10 columns, 9 rows, 5 slices away
        centre = (np.array(marked.pixels.shape) - 1) / 2.0
        slice_, row, column = index - centre
        assert column == pytest.approx(-10.0, abs=0.5)  # patient's right on the image's left
        assert row == pytest.approx(-9.25, abs=0.5)  # anterior up
        assert slice_ == pytest.approx(5.0, abs=0.5)  # superior: higher slice index


def test_same_seed_same_volume_and_other_seeds_differ() -> None:
    first = render_brain(3, lesion=True, **FAST)
    assert _same(first, render_brain(3, lesion=True, **FAST))
    assert not np.array_equal(first.pixels, render_brain(4, lesion=True, **FAST).pixels)


def test_the_lesion_is_the_same_in_world_millimetres_at_every_spacing() -> None:
    fine, coarse = render_brain(5, lesion=True, spacing=2.0), render_brain(5, lesion=True, **FAST)
    centres = [ph.affine[:3, :3] @ np.argwhere(ph.lesion).mean(axis=0) + ph.affine[:3, 3] for ph in (fine, coarse)]
    assert np.linalg.norm(centres[0] - centres[1]) < 2.0
    assert coarse.lesion_volume_mm3 == pytest.approx(fine.lesion_volume_mm3, rel=0.2)


def test_masks_are_exact_nested_inside_the_brain_and_painted_bright() -> None:
    ph = render_brain(1, lesion=True, spacing=2.0)
    assert ph.voxel_mm3 == pytest.approx(8.0, rel=1e-12)
    # the truth is the volume of what was painted: the voxels that differ from the lesion-free volume
    painted = ph.pixels != render_brain(1, lesion=False, spacing=2.0).pixels
    assert ph.lesion_volume_mm3 == pytest.approx(8.0 * np.count_nonzero(painted), rel=0.05)
    assert 0.0 < ph.core_volume_mm3 < ph.lesion_volume_mm3
    assert ph.core.any() and not (ph.core & ~ph.lesion).any() and not (ph.lesion & ~ph.brain).any()
    oedema = ph.lesion & ~ph.core
    ring = ndimage.binary_dilation(ph.lesion, iterations=3) & ph.brain & ~ph.lesion
    # the oedema is brighter than the brain around it (FLAIR-like)
    assert np.median(ph.pixels[oedema]) > 1.15 * np.median(ph.pixels[ring])


def test_lesions_vary_in_size_place_and_presence() -> None:
    phantoms = [render_brain(seed, **FAST) for seed in range(16)]
    volumes = [ph.lesion_volume_mm3 / 1000.0 for ph in phantoms if ph.has_lesion]
    assert len(phantoms) - len(volumes) >= 4 and len(volumes) >= 8  # both kinds among 16 seeds
    assert min(volumes) < 2.0 and max(volumes) > 10.0 and sum(v >= 1.0 for v in volumes) >= len(volumes) / 2
    assert max(volumes) <= 1.3 * VOLUME_RANGE_CM3[1]
    centres = np.array([np.argwhere(ph.lesion).mean(axis=0) for ph in phantoms if ph.has_lesion])
    assert centres.std(axis=0).min() > 2.0  # voxels of 4 mm: lesions are spread over the brain
    free = next(ph for ph in phantoms if not ph.has_lesion)
    assert free.lesion_volume_mm3 == free.core_volume_mm3 == 0.0


def test_lesion_can_be_forced_and_does_not_change_the_rest_of_the_volume() -> None:
    with_lesion, without = render_brain(2, lesion=True, **FAST), render_brain(2, lesion=False, **FAST)
    assert with_lesion.has_lesion and not without.has_lesion
    outside = ~with_lesion.lesion
    assert np.array_equal(with_lesion.pixels[outside], without.pixels[outside])
    changed = with_lesion.pixels != without.pixels
    assert np.count_nonzero(changed[with_lesion.lesion]) >= 0.95 * np.count_nonzero(with_lesion.lesion)


def test_a_forced_lesion_can_fall_outside_a_small_field_of_view() -> None:
    # the place comes from the seed, not the grid: two slices miss seed 0's lesion
    assert render_brain(0, lesion=True, slices=40, **FAST).has_lesion
    assert not render_brain(0, lesion=True, slices=2, **FAST).has_lesion


def test_grid_options_give_the_asked_geometry() -> None:
    ph = render_brain(0, spacing=3.0, slice_spacing=5.0, slices=12, lesion=False)
    assert ph.pixels.shape[0] == 12 and ph.spacing == pytest.approx((5.0, 3.0, 3.0))
    tilted = render_brain(0, oblique=True, **FAST)
    normal = tilted.affine[:3, 0] / 4.0
    assert 0.9 < abs(normal[2]) < 0.999 and tilted.brain.any()


@pytest.mark.parametrize(("kwargs", "name"), [({"spacing": 0.1}, "spacing"), ({"slices": 1}, "slices"),
                                              ({"slice_spacing": 20.0}, "slice_spacing")])
def test_bad_arguments_are_refused_naming_them(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        render_brain(0, **kwargs)
    with pytest.raises(ValueError, match="seed"):
        render_brain(-1)


@pytest.mark.parametrize("oblique", [False, True])
@pytest.mark.parametrize("enhanced", [False, True])
def test_assembly_rebuilds_the_exact_voxels_and_geometry_from_shuffled_files(
        tmp_path: Path, enhanced: bool, oblique: bool) -> None:
    ph = render_brain(6, lesion=True, oblique=oblique, spacing=4.0, slice_spacing=3.0)
    paths = write_brain(tmp_path, ph, enhanced=enhanced)
    random.Random(1).shuffle(paths)
    datasets = [dcmread(path) for path in paths]
    assert len(datasets) == (1 if enhanced else ph.pixels.shape[0])
    assert {ds.SOPClassUID for ds in datasets} == {EnhancedMRImageStorage if enhanced else MRImageStorage}
    volume = assemble(datasets)
    assert np.array_equal(volume.array, ph.pixels)
    assert np.allclose(volume.affine, ph.affine, atol=1e-5)


@pytest.mark.parametrize("enhanced", [False, True])
def test_anisotropic_spacing_survives_both_writers_in_order(tmp_path: Path, enhanced: bool) -> None:
    # slices 3 mm apart, rows 2 mm, columns 1.5 mm: Pixel Spacing is (row step, column step)
    affine = np.array([[0.0, 0.0, 1.5, -30.0], [0.0, 2.0, 0.0, -40.0], [3.0, 0.0, 0.0, 5.0], [0, 0, 0, 1.0]])
    shape = (4, 6, 9)
    pixels = np.random.default_rng(0).integers(0, 4096, shape).astype(np.uint16)
    empty = np.zeros(shape, dtype=bool)
    ph = BrainPhantom(pixels=pixels, affine=affine, brain=~empty, core=empty, lesion=empty, seed=0)
    assert ph.spacing == pytest.approx((3.0, 2.0, 1.5))
    datasets = [dcmread(path) for path in write_brain(tmp_path, ph, enhanced=enhanced)]
    first = datasets[0]
    measures = first.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0] if enhanced else first
    assert [float(v) for v in measures.PixelSpacing] == [2.0, 1.5]
    assert (first.Rows, first.Columns) == (6, 9)
    volume = assemble(datasets)
    assert np.array_equal(volume.array, pixels)
    assert volume.spacing == pytest.approx((3.0, 2.0, 1.5))
    assert np.allclose(volume.affine, affine, atol=1e-5)


def test_uids_differ_between_volumes_and_repeat_for_the_same_volume() -> None:
    with_lesion, without = render_brain(2, lesion=True, **FAST), render_brain(2, lesion=False, **FAST)
    for write in (mr_series, lambda ph: [enhanced_mr(ph)]):
        one, other = write(with_lesion), write(without)
        assert one[0].SeriesInstanceUID != other[0].SeriesInstanceUID
        assert not {ds.SOPInstanceUID for ds in one} & {ds.SOPInstanceUID for ds in other}
        assert one[0].StudyInstanceUID == other[0].StudyInstanceUID  # one patient, one study per seed
        again = write(render_brain(2, lesion=True, **FAST))
        assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID for ds in one]
        assert again[0].SeriesInstanceUID == one[0].SeriesInstanceUID


def test_acquisition_attributes_describe_a_3d_flair() -> None:
    ds = mr_series(render_brain(2, lesion=False, slices=2, **FAST))[0]
    assert list(ds.ScanningSequence) == ["SE", "IR"] and "SK" in ds.SequenceVariant
    assert "MP" in ds.SequenceVariant and ds.MRAcquisitionType == "3D"
    assert int(ds.EchoTrainLength) >= 100  # a long echo train, not a single echo, at TE 380 ms
    assert float(ds.InversionTime) < float(ds.RepetitionTime)


def test_headers_name_the_phantom_and_its_truth_and_are_deterministic(tmp_path: Path) -> None:
    ph = render_brain(7, lesion=True, **FAST)
    series = mr_series(ph)
    first, last = series[0], series[-1]
    assert first.Modality == "MR" and first.PatientID == "PHANTOM-B7" and first.InstanceNumber == 1
    assert first.FrameOfReferenceUID == last.FrameOfReferenceUID == enhanced_mr(ph).FrameOfReferenceUID
    assert first.SeriesInstanceUID != enhanced_mr(ph).SeriesInstanceUID
    assert float(last.SliceLocation) - float(first.SliceLocation) == pytest.approx(4.0 * (len(series) - 1))
    assert f"lesion={ph.lesion_volume_mm3:.0f}mm3" in first.ImageComments
    assert [ds.SOPInstanceUID for ds in mr_series(ph)] == [ds.SOPInstanceUID for ds in series]
    (first_file,), (again,) = (write_brain(tmp_path / name, render_brain(7, lesion=True, **FAST), enhanced=True)
                               for name in ("a", "b"))
    assert first_file.read_bytes() == again.read_bytes()


@pytest.mark.peers
@pytest.mark.parametrize("enhanced", [False, True])
def test_dciodvfy_reports_no_errors_or_warnings(tmp_path: Path, enhanced: bool) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    ph = render_brain(8, lesion=True, oblique=True, **FAST)
    paths = write_brain(tmp_path, ph, enhanced=enhanced)
    for path in (paths[0], paths[-1]):
        errors, output = dciodvfy_errors(dciodvfy, path)
        assert not errors, output
        assert "Warning" not in output, output


def test_command_line_writes_one_study_per_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["brain", str(tmp_path), "--count", "2", "--seed", "3", "--spacing", "4", "--enhanced",
                 "--lesion", "yes"]) == 0
    out = capsys.readouterr().out
    assert "seed 3: 1 files" in out and "mm3" in out
    (path,) = (tmp_path / "brain-4").glob("*.dcm")
    assert dcmread(path).SOPClassUID == EnhancedMRImageStorage
    with pytest.raises(SystemExit):
        main(["brain", str(tmp_path), "--spacing", "0.1"])
    assert "spacing" in capsys.readouterr().err


def test_command_line_without_nilearn_exits_with_the_install_hint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "nilearn", None)
    load_templates.cache_clear()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["brain", str(tmp_path), "--spacing", "4"])
    finally:
        load_templates.cache_clear()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pip install '.[phantoms]'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_brain_alone_is_the_chest_commands_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["brain"]) == 0
    (path,) = (tmp_path / "brain").glob("*.dcm")
    assert dcmread(path).Modality == "CR"
    assert "1 files written to brain" in capsys.readouterr().out

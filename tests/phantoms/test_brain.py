"""Brain MR phantoms: seeded volumes with exact lesion masks, written as MR and Enhanced MR objects that
dciodvfy accepts and that volume assembly rebuilds voxel for voxel."""

import random
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage
from scipy import ndimage

from dicom_node.inference.volume import assemble
from dicom_node.phantoms.__main__ import main
from dicom_node.phantoms.brain import (
    VOLUME_RANGE_CM3,
    BrainPhantom,
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
    assert templates.t1.shape == templates.gm.shape == templates.mask.shape == (197, 233, 189)
    assert not templates.mask.flags.writeable


def test_without_nilearn_the_error_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nilearn", None)
    load_templates.cache_clear()
    try:
        with pytest.raises(ImportError, match=re.escape("pip install '.[phantoms]'")):
            render_brain(0, **FAST)
    finally:
        load_templates.cache_clear()


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
    assert ph.lesion_volume_mm3 == np.count_nonzero(ph.lesion) * ph.voxel_mm3
    assert ph.core_volume_mm3 == np.count_nonzero(ph.core) * ph.voxel_mm3
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

"""Phantom chest radiographs: reproducibility, label priors, exact masks, resolution independence, DICOM."""

import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import config, dcmread
from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation

from dicom_node.phantoms import (
    FIELD_MM,
    LABELS,
    MANUFACTURER,
    PRIOR,
    render,
    stored_values,
    to_dataset,
    write_study,
)
from dicom_node.phantoms.__main__ import main
from dicom_node.phantoms.anatomy import sample_anatomy
from dicom_node.phantoms.findings import sample_findings
from dicom_node.phantoms.render import Grid
from tests.conftest import require_tool

ALL = dict.fromkeys(LABELS, True)
SOP_CLASS = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation}
ENCODINGS = [(m, p) for m in ("CR", "DX") for p in ("MONOCHROME1", "MONOCHROME2")]


@pytest.fixture
def strict() -> Iterator[None]:
    """pydicom raising on invalid values, both reading and writing."""
    settings = config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_same_seed_same_phantom() -> None:
    a, b = render(3, 256), render(3, 256)
    assert a.image.dtype == np.float32 and a.image.shape == (256, 256)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.labels == b.labels and a.masks.keys() == b.masks.keys()
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert a.image.min() >= 0.0 and a.image.max() <= 1.0
    assert a.seed == 3 and a.pixel_spacing_mm == pytest.approx(FIELD_MM / 256)


def test_different_seeds_differ() -> None:
    a, b = render(1, 128, {}), render(2, 128, {})
    assert np.abs(a.image - b.image).mean() > 0.01


def test_labels_drawn_with_the_prior() -> None:
    drawn = [render(seed, 32).labels for seed in range(200)]
    labels = np.array([[d[k] for k in LABELS] for d in drawn])
    assert np.all(np.abs(labels.mean(axis=0) - PRIOR) < 0.1), labels.mean(axis=0)
    assert (labels.sum(axis=1) >= 2).any() and (labels.sum(axis=1) == 0).any()


def test_findings_given_exactly() -> None:
    ph = render(5, 64, {"nodule": True, "effusion": False})
    assert ph.labels == {"nodule": True, "consolidation": False, "effusion": False, "cardiomegaly": False}
    assert list(ph.masks) == ["nodule"]
    with pytest.raises(ValueError, match="pneumothorax"):
        render(5, 64, {"pneumothorax": True})
    with pytest.raises(ValueError, match="seed"):
        render(-1, 64)
    with pytest.raises(ValueError, match="size"):
        render(1, 8)


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_masks_present_iff_label(seed: int) -> None:
    ph = render(seed, 128)
    assert set(ph.masks) == {k for k, present in ph.labels.items() if present}
    for mask in ph.masks.values():
        assert mask.dtype == bool and mask.shape == (128, 128) and mask.any()
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


@pytest.mark.parametrize("seed", [0, 7, 21, 33])
def test_nodule_mask_is_a_disc_of_the_right_size(seed: int) -> None:
    ph = render(seed, 512, {"nodule": True})
    mask = ph.masks["nodule"]
    rows, cols = np.nonzero(mask)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    diameter_mm = 2.0 * np.sqrt(mask.sum() / np.pi) * ph.pixel_spacing_mm
    assert 7.0 < diameter_mm < 31.0
    assert abs(height - width) <= 2
    assert mask.sum() / (height * width) == pytest.approx(np.pi / 4, abs=0.08)


@pytest.mark.parametrize("seed", [1, 4, 12, 30])
def test_nodule_brighter_than_its_ring(seed: int) -> None:
    ph = render(seed, 256, {"nodule": True})
    mask = ph.masks["nodule"].astype(np.uint8)
    radius = max(2, int(np.sqrt(mask.sum() / np.pi)))
    ring = cv2.dilate(mask, np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)).astype(bool) & ~mask.astype(bool)
    assert ph.image[mask.astype(bool)].mean() > ph.image[ring].mean() + 0.05


@pytest.mark.parametrize("label", LABELS)
def test_each_finding_brightens_its_mask(label: str) -> None:
    """The same patient with and without the finding: the finding shows inside its mask."""
    for seed in (2, 9):
        with_it, without = render(seed, 256, {label: True}), render(seed, 256, {})
        mask = with_it.masks[label]
        assert with_it.image[mask].mean() > without.image[mask].mean() + 0.08
        assert np.abs(with_it.image[~mask] - without.image[~mask]).mean() < 0.02


def test_cardiothoracic_ratio() -> None:
    grid = Grid(512)
    for seed in range(10):
        rng = np.random.default_rng([seed, 0])
        anatomy = sample_anatomy(rng)
        geometry = sample_findings(rng, anatomy)
        for heart, low, high in ((anatomy.heart, 0.40, 0.50), (geometry.large_heart, 0.57, 0.70)):
            mask = grid.mask(heart.box, partial(anatomy.heart_inside, heart))
            columns = np.nonzero(mask.any(axis=0))[0]
            ratio = (np.ptp(columns) + 1) / 512 / anatomy.thoracic_width
            assert low < ratio < high, (seed, ratio)
        if seed == 0:
            ph = render(0, 512, {"cardiomegaly": True})
            expected = grid.mask(geometry.large_heart.box, partial(anatomy.heart_inside, geometry.large_heart))
            assert np.array_equal(ph.masks["cardiomegaly"], expected)


def test_resolution_independence() -> None:
    small, large = render(11, 256, ALL), render(11, 2048, ALL)
    for label in LABELS:
        down = large.masks[label].reshape(256, 8, 256, 8).mean(axis=(1, 3)) >= 0.5
        assert _iou(small.masks[label], down) > 0.8, label
    large_down = cv2.resize(large.image, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(large_down - small.image).mean() < 0.02


@pytest.mark.parametrize("bits", [12, 16])
def test_monochrome1_is_the_inverse_of_monochrome2(bits: int) -> None:
    ph = render(4, 64)
    maxval = 2**bits - 1
    mono2 = to_dataset(ph, photometric="MONOCHROME2", bits_stored=bits).pixel_array.astype(np.int64)
    mono1 = to_dataset(ph, photometric="MONOCHROME1", bits_stored=bits).pixel_array.astype(np.int64)
    assert np.array_equal(mono1, maxval - mono2)
    assert np.array_equal(mono2, np.rint(ph.image.astype(np.float64) * maxval))
    assert mono2.min() >= 0 and mono2.max() <= maxval


@pytest.mark.parametrize(("modality", "photometric"), ENCODINGS)
def test_write_study_reads_back_strictly(tmp_path: Path, strict: None, modality: str, photometric: str) -> None:
    paths = write_study(tmp_path, 2, 40, size=64, modality=modality, photometric=photometric)
    datasets = [dcmread(path) for path in paths]
    assert [p.name for p in paths] == [f"{ds.SOPInstanceUID}.dcm" for ds in datasets]
    assert len({ds.SOPInstanceUID for ds in datasets}) == 2
    assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID, str(ds.PatientName)) for ds in datasets}) == 1
    for number, ds in enumerate(datasets, start=1):
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == SOP_CLASS[modality]
        assert ds.Modality == modality and ds.PhotometricInterpretation == photometric
        assert ds.InstanceNumber == number and ds.Manufacturer == MANUFACTURER
        assert ds.PatientID == "PHANTOM-40" and ds.BodyPartExamined == "CHEST"
        expected = stored_values(render(39 + number, 64).image, photometric, 12)
        assert np.array_equal(ds.pixel_array, expected)
        assert float(ds.PixelSpacing[0]) == pytest.approx(FIELD_MM / 64, rel=1e-5)
    again = write_study(tmp_path / "again", 2, 40, size=64, modality=modality, photometric=photometric)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


@pytest.mark.peers
@pytest.mark.parametrize(("modality", "photometric"), ENCODINGS)
def test_dciodvfy_reports_no_errors(tmp_path: Path, modality: str, photometric: str) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    findings = ALL if photometric == "MONOCHROME1" else {}
    (path,) = write_study(tmp_path, 1, 8, size=64, findings=findings, modality=modality,
                          photometric=photometric, bits_stored=16 if modality == "DX" else 12)
    result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert not errors, output


def test_to_dataset_rejects_bad_arguments() -> None:
    ph = render(0, 32)
    for kwargs, name in (({"modality": "CT"}, "modality"), ({"photometric": "RGB"}, "photometric"),
                         ({"bits_stored": 8}, "bits_stored")):
        with pytest.raises(ValueError, match=name):
            to_dataset(ph, **kwargs)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--count", "2", "--seed", "3", "--size", "48", "--modality", "DX",
                 "--photometric", "MONOCHROME1"]) == 0
    assert "2 files written" in capsys.readouterr().out
    files = sorted(tmp_path.glob("*.dcm"))
    assert len(files) == 2
    ds = dcmread(files[0])
    assert ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME1" and ds.Rows == 48

"""Preprocessing on pydicom's bundled files and on synthetic radiographs; the exact pixel map."""

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicom_node.errors import PermanentError
from dicom_node.inference.manifest import InputSpec
from dicom_node.inference.preprocess import LetterboxMap, letterbox, preprocess
from dicom_node.inference.voi import window_linear
from tests.factories import ct_dataset

SPEC = InputSpec(size=64, channels=1)


@pytest.mark.parametrize(
    ("name", "photometric"),
    [
        ("CT_small.dcm", "MONOCHROME2"),  # explicit little endian, rescale
        ("MR_small_bigendian.dcm", "MONOCHROME2"),
        ("MR_small_RLE.dcm", "MONOCHROME2"),
        ("MR_small_jp2klossless.dcm", "MONOCHROME2"),
        ("MR_small_jpeg_ls_lossless.dcm", "MONOCHROME2"),
        ("JPEG2000.dcm", "MONOCHROME2"),
        ("JPGExtended.dcm", "MONOCHROME2"),
        ("SC_rgb_jpeg_dcmtk.dcm", "YBR_FULL"),
        ("SC_rgb_rle.dcm", "RGB"),
        ("examples_palette.dcm", "PALETTE COLOR"),
        ("SC_ybr_full_422_uncompressed.dcm", "YBR_FULL_422"),
        ("image_dfl.dcm", "MONOCHROME2"),
    ],
)
def test_bundled_files_in_many_syntaxes_and_photometrics(name: str, photometric: str) -> None:
    ds = dcmread(get_testdata_file(name))
    assert ds.PhotometricInterpretation == photometric
    for spec in (SPEC, InputSpec(size=64, channels=3, normalization="imagenet")):
        [out] = preprocess(ds, spec)
        assert out.array.shape == (spec.channels, 64, 64) and out.array.dtype == np.float32
        assert np.isfinite(out.array).all()
        assert out.map.source_shape == (ds.Rows, ds.Columns)
    [out] = preprocess(ds, SPEC)
    inside = out.array[0][out.map.pad_y:64 - out.map.pad_y, out.map.pad_x:64 - out.map.pad_x]
    assert out.array.min() >= 0.0 and out.array.max() <= 1.0
    assert inside.std() > 0.02  # an image, not a flat field


def test_multiframe_policy() -> None:
    ds = dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert [p.frame for p in preprocess(ds, InputSpec(size=32, multiframe="all"))] == [0, 1]
    assert [p.frame for p in preprocess(ds, InputSpec(size=32, multiframe="middle"))] == [1]


def _radiograph(photometric: str) -> object:
    ds = ct_dataset(size=96, seed=3)
    ds.Rows, ds.Columns = 96, 64
    stored = np.random.default_rng(4).integers(0, 4096, (96, 64)).astype(np.uint16)
    stored[20:40, 10:30] = 3500  # a bright structure
    if photometric == "MONOCHROME1":
        stored = 4095 - stored
    ds.PixelData = stored.tobytes()
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PhotometricInterpretation = photometric
    ds.WindowCenter, ds.WindowWidth = (2048, 3000) if photometric == "MONOCHROME2" else (4095 - 2048 + 1, 3000)
    return ds


def test_monochrome1_and_monochrome2_of_the_same_image_give_the_same_tensor() -> None:
    [mono2] = preprocess(_radiograph("MONOCHROME2"), SPEC)
    [mono1] = preprocess(_radiograph("MONOCHROME1"), SPEC)
    np.testing.assert_allclose(mono1.array, mono2.array, atol=1e-6)
    assert mono2.window_source == "file"


def test_window_falls_back_to_manifest_then_percentiles() -> None:
    ds = _radiograph("MONOCHROME2")
    del ds.WindowCenter, ds.WindowWidth
    [manifest] = preprocess(ds, InputSpec(size=64, window_center=1000, window_width=500))
    assert manifest.window_source == "manifest" and manifest.window == (1000, 500)
    [robust] = preprocess(ds, SPEC)
    assert robust.window_source == "percentile"
    assert 0 < robust.window[0] < 4096  # type: ignore[index]


def test_rescale_and_window_follow_the_standard() -> None:
    values = np.array([0, 1023.5, 1024, 2048, 4096], dtype=np.float32)
    out = window_linear(values, center=2048, width=2049)
    assert out[0] == 0.0 and out[-1] == 1.0 and abs(out[3] - (0.5 / 2048 + 0.5)) < 1e-6
    ct = ct_dataset(size=64)  # stored values + RescaleIntercept -1024 = HU; the window is in HU
    stored = np.full((64, 64), 1024 + 40, dtype=np.uint16)  # 40 HU everywhere
    stored[:, :32] = 1024 - 1000  # air on the left half
    ct.PixelData = stored.tobytes()
    ct.WindowCenter, ct.WindowWidth = 40, 400
    [out] = preprocess(ct, SPEC)
    assert out.window == (40.0, 400.0)
    assert out.array[0, 32, 5] == 0.0 and out.array[0, 32, 60] == pytest.approx(0.5, abs=0.01)


def test_normalisation_conventions() -> None:
    ds = _radiograph("MONOCHROME2")
    [zero_one] = preprocess(ds, SPEC)
    [xrv] = preprocess(ds, InputSpec(size=64, normalization="xrv"))
    np.testing.assert_allclose(xrv.array, (2 * zero_one.array - 1) * 1024, atol=1e-3)
    [imagenet] = preprocess(ds, InputSpec(size=64, channels=3, normalization="imagenet"))
    np.testing.assert_allclose(imagenet.array[0], (zero_one.array[0] - 0.485) / 0.229, atol=1e-5)


@pytest.mark.parametrize(("rows", "columns"), [(2000, 1600), (1600, 2000), (512, 512), (37, 1000)])
def test_the_model_to_source_map_is_exact_at_corners_and_centre(rows: int, columns: int) -> None:
    mapping = LetterboxMap.fit(rows, columns, 256)
    height, width = mapping.resized_shape
    corners_model = [(mapping.pad_x, mapping.pad_y), (mapping.pad_x + width, mapping.pad_y + height),
                     (mapping.pad_x + width / 2, mapping.pad_y + height / 2)]
    expected = [(0, 0), (columns, rows), (columns / 2, rows / 2)]
    for (u, v), (x, y) in zip(corners_model, expected, strict=True):
        assert mapping.model_to_source(u, v) == pytest.approx((x, y), abs=1e-9)
        assert mapping.source_to_model(x, y) == pytest.approx((u, v), abs=1e-9)


def test_letterbox_puts_each_source_pixel_where_the_map_says() -> None:
    image = np.zeros((200, 100, 1), dtype=np.float32)
    image[100:120, 40:60] = 1.0  # a square around source centre (50, 110)
    square, mapping = letterbox(image, 100)
    u, v = mapping.source_to_model(50.0, 110.0)
    assert square[int(v), int(u), 0] == pytest.approx(1.0)
    ys, xs = np.nonzero(square[:, :, 0] > 0.5)
    assert mapping.model_to_source(xs.mean() + 0.5, ys.mean() + 0.5) == pytest.approx((50, 110), abs=1.0)


def test_warp_to_source_brings_a_model_grid_map_back_to_the_native_grid() -> None:
    rows, columns = 300, 200
    mapping = LetterboxMap.fit(rows, columns, 128)
    model = np.zeros((128, 128), dtype=np.float32)
    u, v = mapping.source_to_model(150.0, 75.0)  # source point x=150, y=75
    model[int(v) - 2:int(v) + 3, int(u) - 2:int(u) + 3] = 1.0
    native = mapping.warp_to_source(model)
    assert native.shape == (rows, columns)
    ys, xs = np.mgrid[0:rows, 0:columns] + 0.5
    centre = ((native * xs).sum() / native.sum(), (native * ys).sum() / native.sum())
    block = mapping.model_to_source(int(u) + 0.5, int(v) + 0.5)  # centre of the 5x5 block
    assert centre == pytest.approx(block, abs=0.5)
    assert abs(block[0] - 150) < 2 / mapping.scale_x and abs(block[1] - 75) < 2 / mapping.scale_y


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"PhotometricInterpretation": "HSV"}, "photometric interpretation 'HSV' is not supported"),
     ({"PixelData": None}, "no Pixel Data")],
)
def test_unsupported_input_fails_permanently_with_a_reason(change: dict, reason: str) -> None:
    ds = _radiograph("MONOCHROME2")
    for key, value in change.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    with pytest.raises(PermanentError, match=reason):
        preprocess(ds, SPEC)


def test_undecodable_pixels_fail_permanently() -> None:
    ds = dcmread(get_testdata_file("JPEG2000.dcm"))
    ds.PixelData = ds.PixelData[:200]  # truncated codestream
    with pytest.raises(PermanentError, match="cannot decode pixel data"):
        preprocess(ds, SPEC)


@pytest.mark.parametrize("bits", [12, 16])
def test_a_phantom_as_monochrome1_or_monochrome2_gives_the_same_tensor(bits: int) -> None:
    from dicom_node.phantoms import render, to_dataset

    phantom = render(11, 512)
    [mono2] = preprocess(to_dataset(phantom, photometric="MONOCHROME2", bits_stored=bits), SPEC)
    [mono1] = preprocess(to_dataset(phantom, photometric="MONOCHROME1", bits_stored=bits), SPEC)
    np.testing.assert_allclose(mono1.array, mono2.array, atol=1e-5)
    assert mono1.array.std() > 0.1


@pytest.mark.parametrize(("rows", "columns", "r", "c"), [(300, 200, 120, 50), (37, 1000, 10, 900), (500, 500, 0, 499)])
def test_letterbox_and_its_map_agree_to_a_fraction_of_a_pixel(rows: int, columns: int, r: int, c: int) -> None:
    image = np.zeros((rows, columns, 1), dtype=np.float32)
    image[r, c] = 1.0
    square, mapping = letterbox(image, 128)
    weights = square[:, :, 0]
    ys, xs = np.mgrid[0:128, 0:128] + 0.5
    centre = ((weights * xs).sum() / weights.sum(), (weights * ys).sum() / weights.sum())
    assert mapping.model_to_source(*centre) == pytest.approx((c + 0.5, r + 0.5), abs=0.5 / min(mapping.scale_x, 1) + 0.5)

"""Modality LUT and VOI edge cases: functional groups, VOI LUTs on rescaled values, bad values."""

import io

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node.errors import PermanentError
from dicom_node.inference.manifest import InputSpec
from dicom_node.inference.preprocess import preprocess
from dicom_node.inference.voi import Window, modality_lut, to_display, window_linear
from tests.factories import ct_dataset

SPEC = InputSpec(size=32)


def _item(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _half_air_half_tissue(frames: int = 1) -> tuple[Dataset, np.ndarray]:
    ds = ct_dataset(size=32)
    stored = np.full((frames, 32, 32), 1024 + 40, dtype=np.uint16)  # 40 HU with intercept -1024
    stored[:, :, :16] = 1024 - 1000  # air
    ds.PixelData = stored.tobytes()
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds, stored


def test_enhanced_multiframe_takes_rescale_and_window_from_functional_groups() -> None:
    ds, _ = _half_air_half_tissue(frames=3)
    del ds.RescaleIntercept, ds.RescaleSlope
    ds.SharedFunctionalGroupsSequence = Sequence([_item(
        PixelValueTransformationSequence=Sequence([_item(RescaleIntercept=-1024, RescaleSlope=1,
                                                         RescaleType="HU")]),
        FrameVOILUTSequence=Sequence([_item(WindowCenter=40, WindowWidth=400)]),
    )])
    [out] = preprocess(ds, SPEC)
    assert out.frame == 1 and out.window == (40.0, 400.0) and out.window_source == "file"
    assert out.array[0, 16, 2] == 0.0 and out.array[0, 16, 30] == pytest.approx(0.5, abs=0.01)


def test_per_frame_groups_win_over_shared_ones() -> None:
    ds, _ = _half_air_half_tissue(frames=2)
    del ds.RescaleIntercept, ds.RescaleSlope
    voi = [_item(FrameVOILUTSequence=Sequence([_item(WindowCenter=c, WindowWidth=400)])) for c in (40, 240)]
    ds.PerFrameFunctionalGroupsSequence = Sequence(voi)
    ds.SharedFunctionalGroupsSequence = Sequence([_item(
        PixelValueTransformationSequence=Sequence([_item(RescaleIntercept=-1024, RescaleSlope=1)]))])
    outs = preprocess(ds, InputSpec(size=32, multiframe="all"))
    assert [o.window for o in outs] == [(40.0, 400.0), (240.0, 400.0)]
    assert outs[0].array[0, 16, 30] > outs[1].array[0, 16, 30]


def test_a_voi_lut_applies_to_rescaled_values() -> None:
    ds, _ = _half_air_half_tissue()
    lut = np.linspace(0, 4095, 401).astype(np.uint16)  # -160 HU .. 240 HU -> 0 .. 4095
    ds.VOILUTSequence = Sequence([_item(LUTDescriptor=[401, -160, 12], LUTData=lut.tolist())])
    values = modality_lut(ds, np.frombuffer(ds.PixelData, np.uint16).reshape(32, 32), 0)
    unit, window, source = to_display(ds, np.frombuffer(ds.PixelData, np.uint16).reshape(32, 32), 0, None)
    assert source == "voi-lut" and window is None
    assert values[0, 30] == 40.0
    assert unit[0, 30] == pytest.approx(200 / 400, abs=0.01)  # 40 HU is the LUT's middle
    assert unit[0, 2] == 0.0


def test_unusable_file_windows_fall_back_and_never_give_nan() -> None:
    ds, _ = _half_air_half_tissue()
    ds.WindowCenter, ds.WindowWidth = "", ""
    [out] = preprocess(ds, SPEC)
    assert out.window_source == "percentile" and np.isfinite(out.array).all()
    ds.WindowCenter, ds.WindowWidth = 40.5, 1  # a LINEAR threshold: the formula divides by zero
    [out] = preprocess(ds, SPEC)
    assert out.window_source == "file" and set(np.unique(out.array)) <= {0.0, 1.0}
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40, 0.5, "LINEAR_EXACT"  # valid: width > 0
    [out] = preprocess(ds, SPEC)
    assert out.window == (40.0, 0.5)


def test_window_functions_match_the_standard() -> None:
    x = np.array([-100.0, 0.0, 100.0], dtype=np.float32)
    assert window_linear(x, 0, 100, "LINEAR_EXACT").tolist() == [0.0, 0.5, 1.0]
    assert window_linear(x, 0, 100, "SIGMOID").tolist() == pytest.approx(
        [1 / (1 + np.exp(4)), 0.5, 1 / (1 + np.exp(-4))])
    with pytest.raises(ValueError):
        Window(0, float("nan"))


def test_non_finite_pixel_values_fail_permanently() -> None:
    ds, _ = _half_air_half_tissue()
    with pytest.raises(PermanentError, match="not finite"):
        modality_lut(ds, np.array([[np.nan, 1.0]], dtype=np.float32), 0)
    buffer = io.BytesIO()
    ds.RescaleSlope = "7"
    ds.save_as(buffer, enforce_file_format=True)
    damaged = dcmread(io.BytesIO(buffer.getvalue().replace(b"DS\x02\x007 ", b"DS\x02\x00a ", 1)))
    with pytest.raises(PermanentError, match="not numbers"):
        modality_lut(damaged, np.ones((2, 2), dtype=np.uint16), 0)

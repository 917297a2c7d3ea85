"""Volume assembly: sorting, spacing, refusals, enhanced multi-frame, affine, exact round trips."""

import copy
import math

import highdicom
import numpy as np
import pytest
from highdicom.spatial import get_volume_positions
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.inference.volume import Volume, VolumeError, assemble, back, grid_map, resample, source_of

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.8.498.1"


def _rotation(x_degrees: float, z_degrees: float) -> np.ndarray:
    a, b = math.radians(x_degrees), math.radians(z_degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def _oblique(x_degrees: float = 20.0, z_degrees: float = 20.0) -> tuple[float, ...]:
    rotation = _rotation(x_degrees, z_degrees)
    return (*rotation @ np.array(AXIAL[:3]), *rotation @ np.array(AXIAL[3:]))


def _image(ds: Dataset, pixels: np.ndarray) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = pixels.astype("<i2").tobytes()


def _slices(n: int = 8, *, step: float = 2.5, orientation: tuple[float, ...] = AXIAL,
            spacing: tuple[float, float] = (0.7, 0.9), size: int = 16, seed: int = 0,
            slope: float | None = None, intercept: float | None = None) -> list[Dataset]:
    """A CT series along the normal of ``orientation``, in acquisition order, with random pixels."""
    rng = np.random.default_rng(seed)
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.array([-12.5, 30.0, 101.0])
    study, series_uid = generate_uid(), generate_uid()
    series = []
    for k in range(n):
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = "CT"
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = FRAME_OF_REFERENCE
        ds.ImagePositionPatient = [round(float(v), 6) for v in origin + k * step * normal]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = 7.0  # deliberately not the step: the spacing must come from positions
        ds.SpacingBetweenSlices = 9.0
        if slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        _image(ds, rng.integers(-500, 1500, size=(size, size)))
        series.append(ds)
    return series


def _raw(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.pixel_array, dtype=np.float32)


def _shuffled(series: list[Dataset], seed: int = 1, *, lie: bool = True) -> list[Dataset]:
    order = np.random.default_rng(seed).permutation(len(series))
    shuffled = [series[i] for i in order]
    if not lie:
        return shuffled
    for ds, lie in zip(shuffled, range(len(series), 0, -1), strict=True):
        ds.InstanceNumber = lie  # Instance Number must not decide the order
    return shuffled


def test_shuffled_slices_are_sorted_by_position_not_instance_number() -> None:
    series = _slices()
    volume = assemble(_shuffled(series))
    assert [s.sop_instance_uid for s in volume.sources] == [ds.SOPInstanceUID for ds in series]
    assert all(s.frame == 1 for s in volume.sources)
    np.testing.assert_array_equal(volume.array, np.stack([_raw(ds) for ds in series]))
    assert volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.9))


def test_rescale_slope_and_intercept_are_applied() -> None:
    series = _slices(slope=2.0, intercept=-1024.0)
    volume = assemble(series)
    np.testing.assert_array_equal(volume.array[3], _raw(series[3]) * 2.0 - 1024.0)


def _move(series: list[Dataset], index: int, by: float) -> list[Dataset]:
    position = np.array(series[index].ImagePositionPatient, dtype=float)
    series[index].ImagePositionPatient = list(position + np.array([0.0, 0.0, by]))
    return series


def _drop(series: list[Dataset], index: int) -> list[Dataset]:
    del series[index]
    return series


def _set(index: int, keyword: str, value: object):
    def mutate(series: list[Dataset]) -> list[Dataset]:
        setattr(series[index], keyword, value)
        return series
    return mutate


def _delete(index: int, keyword: str):
    def mutate(series: list[Dataset]) -> list[Dataset]:
        delattr(series[index], keyword)
        return series
    return mutate


def _shear(series: list[Dataset]) -> list[Dataset]:
    for k, ds in enumerate(series):
        position = np.array(ds.ImagePositionPatient, dtype=float)
        ds.ImagePositionPatient = list(position + np.array([0.3 * k, 0.0, 0.0]))
    return series


def _resize(series: list[Dataset]) -> list[Dataset]:
    _image(series[5], np.zeros((16, 12)))
    return series


REFUSALS = [
    ("gap", lambda s: _drop(s, 4), ["gap", "1 slice(s) missing", "instance 4 ", "instance 6 "]),
    ("uneven", lambda s: _move(s, 5, 0.6), ["uneven spacing", "instance 6 ", "3.100 mm", "2.500 mm"]),
    ("duplicate", lambda s: _move(s, 3, -2.5), ["duplicate positions", "instance 3 ", "instance 4 "]),
    ("mixed orientation", _set(2, "ImageOrientationPatient", list(_oblique(1.0, 0.0))),
     ["mixed orientations", "instance 3 ", "not parallel"]),
    ("sheared", _shear, ["sheared stack", "instance 8 ", "shifted 2.100 mm"]),
    ("one slice", lambda s: s[:1], ["at least 2 slices", "has 1"]),
    ("no position", _delete(6, "ImagePositionPatient"), ["instance 7 ", "no Image Position (Patient)"]),
    ("no orientation", _delete(0, "ImageOrientationPatient"), ["instance 1 ", "no Image Orientation"]),
    ("no pixel spacing", _delete(2, "PixelSpacing"), ["instance 3 ", "no Pixel Spacing"]),
    ("zero pixel spacing", _set(1, "PixelSpacing", [0.0, 0.0]), ["instance 2 ", "must be > 0 mm"]),
    ("mixed pixel spacing", _set(4, "PixelSpacing", [0.8, 0.9]), ["mixed pixel spacings", "instance 5 "]),
    ("mixed sizes", _resize, ["mixed image sizes", "instance 6 ", "16x12"]),
    ("mixed frame of reference", _set(3, "FrameOfReferenceUID", "1.2.3"), ["mixed frames of reference"]),
    ("not unit cosines", lambda s: [_set(i, "ImageOrientationPatient", [2, 0, 0, 0, 1, 0])(s)[i] for i in range(8)],
     ["perpendicular unit directions"]),
]


@pytest.mark.parametrize(("mutate", "words"), [(m, w) for _, m, w in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusal_names_the_problem(mutate, words: list[str]) -> None:
    with pytest.raises(VolumeError) as raised:
        assemble(_shuffled(mutate(_slices()), lie=False))
    for word in words:
        assert word in str(raised.value), f"{word!r} not in {raised.value}"


def test_steps_each_within_the_tolerance_that_add_up_are_refused() -> None:
    """40 axial steps of 2.5 mm, then 20 of 2.524 mm (each 0.96% off: within the per-step
    tolerance): the last slices drift half a millimetre from any even step, so no single affine
    places them; positions with DS rounding jitter are still a volume."""
    series = _slices(61)
    for k in range(41, 61):
        _move(series, k, 0.024 * (k - 40))
    with pytest.raises(VolumeError, match=r"uneven spacing: .* mm from where an even step"):
        assemble(series)
    jittered = _slices(61)
    for k, ds in enumerate(jittered):
        ds.ImagePositionPatient = [round(float(v), 2) + (0.004 if k % 3 else 0.0) for v in ds.ImagePositionPatient]
    assert assemble(jittered).array.shape[0] == 61
    with pytest.raises(TypeError):
        source_of(assemble(_slices()), (0.6, 1, 2))  # a fractional index is a mistake, not voxel 0


def test_highdicom_agrees_on_accepted_and_refused_stacks() -> None:
    for series, regular in ((_slices(orientation=_oblique()), True), (_drop(_slices(), 4), False),
                            (_move(_slices(), 5, 0.6), False), (_shear(_slices()), False)):
        spacing, _ = get_volume_positions([ds.ImagePositionPatient for ds in series],
                                          series[0].ImageOrientationPatient)
        assert (spacing is not None) is regular
        if regular:
            assert spacing == pytest.approx(assemble(series).spacing[0])


def _assert_same_as_highdicom(ours: Volume, theirs: highdicom.Volume) -> None:
    """highdicom stacks along -(row x column): the same voxels and geometry with the slices reversed."""
    np.testing.assert_array_equal(np.asarray(theirs.array, dtype=np.float32), ours.array[::-1])
    last = ours.array.shape[0] - 1
    for k, r, c in ((0, 0, 0), (last, 5, 3), (2, 7, 1)):
        np.testing.assert_allclose(theirs.affine @ [last - k, r, c, 1], ours.affine @ [k, r, c, 1], atol=1e-5)


def test_voxels_and_affine_match_highdicom_volumes() -> None:
    series = _slices(orientation=_oblique(), size=8, slope=2.0, intercept=-1024.0)
    _assert_same_as_highdicom(assemble(_shuffled(series)), highdicom.get_volume_from_series(series))
    order = [int(i) for i in np.random.default_rng(3).permutation(len(series))]
    enhanced = _enhanced(series, order, per_frame_geometry=False)
    theirs = highdicom.Image.from_dataset(enhanced, copy=False).get_volume()
    _assert_same_as_highdicom(assemble([enhanced]), theirs)


def _patient(ds: Dataset, row: int, column: int) -> np.ndarray:
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    spacing = [float(v) for v in ds.PixelSpacing]
    return (np.array(ds.ImagePositionPatient, dtype=float) + row * spacing[0] * orientation[3:]
            + column * spacing[1] * orientation[:3])


def test_oblique_stack_affine_gives_each_voxel_its_source_position() -> None:
    series = _slices(orientation=_oblique(20.0, 20.0), size=6)
    volume = assemble(_shuffled(series))
    by_uid = {ds.SOPInstanceUID: ds for ds in series}
    for index in np.ndindex(volume.array.shape):
        uid, _, row, column = source_of(volume, index)
        expected = _patient(by_uid[uid], row, column)
        np.testing.assert_allclose((volume.affine @ [*index, 1.0])[:3], expected, atol=1e-4)
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.9))


def test_round_trip_voxel_to_source_pixel_is_exact_for_every_voxel() -> None:
    series = _slices(orientation=_oblique(-35.0, 10.0), slope=0.5, intercept=-3.0)
    volume = assemble(_shuffled(series, seed=7))
    by_uid = {ds.SOPInstanceUID: _raw(ds) * 0.5 - 3.0 for ds in series}
    for index in np.ndindex(volume.array.shape):
        uid, frame, row, column = source_of(volume, index)
        assert frame == 1
        assert by_uid[uid][row, column] == volume.array[index]
    with pytest.raises(IndexError):
        source_of(volume, (8, 0, 0))


def _enhanced(series: list[Dataset], order: list[int], *, per_frame_geometry: bool) -> Dataset:
    """An enhanced MR instance whose frames are ``series`` in ``order``, geometry in functional groups."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series[0].StudyInstanceUID, generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE
    ds.NumberOfFrames = len(order)
    _image(ds, np.stack([series[i].pixel_array for i in order]))
    measures, plane_orientation, transformation = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = series[0].PixelSpacing
    measures.SliceThickness = 7.0
    plane_orientation.ImageOrientationPatient = series[0].ImageOrientationPatient
    transformation.RescaleSlope, transformation.RescaleIntercept = 3.0, 5.0
    transformation.RescaleType = "US"
    shared = Dataset()
    shared.PixelValueTransformationSequence = [transformation]
    frames = []
    for i in order:
        frame, position = Dataset(), Dataset()
        position.ImagePositionPatient = series[i].ImagePositionPatient
        frame.PlanePositionSequence = [position]
        if per_frame_geometry:
            frame.PixelMeasuresSequence = [copy.deepcopy(measures)]
            frame.PlaneOrientationSequence = [copy.deepcopy(plane_orientation)]
        frames.append(frame)
    if not per_frame_geometry:
        shared.PixelMeasuresSequence = [measures]
        shared.PlaneOrientationSequence = [plane_orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = frames
    return ds


@pytest.mark.parametrize("per_frame_geometry", [False, True], ids=["shared-groups", "per-frame-groups"])
def test_enhanced_multiframe_mr_through_functional_groups(per_frame_geometry: bool) -> None:
    series = _slices(orientation=_oblique(20.0, -20.0), size=8)
    order = [int(i) for i in np.random.default_rng(3).permutation(len(series))]
    enhanced = _enhanced(series, order, per_frame_geometry=per_frame_geometry)
    volume = assemble([enhanced])
    # Slice k of the volume is series[k]: frame number (1-based) where it was stored.
    assert [s.frame for s in volume.sources] == [order.index(k) + 1 for k in range(len(series))]
    assert {s.sop_instance_uid for s in volume.sources} == {enhanced.SOPInstanceUID}
    np.testing.assert_array_equal(volume.array, np.stack([_raw(ds) * 3.0 + 5.0 for ds in series]))
    frames = enhanced.pixel_array
    for index in np.ndindex(volume.array.shape):
        _, frame, row, column = source_of(volume, index)
        assert frames[frame - 1, row, column] * 3.0 + 5.0 == volume.array[index]
    np.testing.assert_allclose(volume.affine[:3, 3], series[0].ImagePositionPatient, atol=1e-5)
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.9))


def test_enhanced_multiframe_with_a_gap_is_refused_naming_the_frame() -> None:
    series = _slices()
    enhanced = _enhanced(series, [0, 1, 2, 4, 5, 6, 7], per_frame_geometry=False)
    with pytest.raises(VolumeError, match=r"gap: .*frame 3 of instance 1 .*frame 4 of instance 1 "):
        assemble([enhanced])


def test_resample_and_back_returns_the_mask_on_an_integer_factor_grid() -> None:
    volume = assemble(_slices(orientation=_oblique()))
    rng = np.random.default_rng(5)
    labels = (rng.random((8, 16, 16)) > 0.7).astype(np.uint8) * rng.integers(1, 4, size=(8, 16, 16))
    mask_volume = Volume(array=labels.astype(np.float32), affine=volume.affine, sources=volume.sources)
    on_model, mapping = resample(mask_volume, (16, 32, 48), mask=True)
    assert on_model.shape == (16, 32, 48)
    assert set(np.unique(on_model)) <= {0.0, 1.0, 2.0, 3.0}
    back_again = back(mapping, on_model.astype(np.uint8), mask=True)
    np.testing.assert_array_equal(back_again, labels)
    assert back_again.dtype == np.uint8


def test_resample_maps_keep_geometry_and_linear_back_is_close() -> None:
    volume = assemble(_slices(orientation=_oblique()))
    mapping = grid_map(volume, (96, 96, 96))
    # The model grid's affine and the source's agree on where a model voxel is.
    for m in ((0, 0, 0), (95, 0, 40), (50, 95, 95)):
        source_index = np.array(mapping.scale) * m + np.array(mapping.offset)
        np.testing.assert_allclose(mapping.model_affine @ [*m, 1], volume.affine @ [*source_index, 1])
    # Centres of the field of view coincide.
    centre_model = mapping.model_affine @ [47.5, 47.5, 47.5, 1]
    centre_source = volume.affine @ [3.5, 7.5, 7.5, 1]
    np.testing.assert_allclose(centre_model, centre_source)
    k, r, c = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (8, 16, 16)), indexing="ij")
    ramp = Volume(array=2 * k + r - 0.5 * c, affine=volume.affine, sources=volume.sources)
    on_model, ramp_map = resample(ramp, (12, 24, 40))
    again = back(ramp_map, on_model)
    assert again.dtype == np.float32
    np.testing.assert_allclose(again[1:-1, 1:-1, 1:-1], ramp.array[1:-1, 1:-1, 1:-1], atol=1e-4)
    with pytest.raises(ValueError, match="model grid"):
        back(ramp_map, on_model[:-1])

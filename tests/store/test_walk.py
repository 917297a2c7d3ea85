"""The structural check of data sets: every malformed case refused, real files accepted."""

import io
import os
import struct
import sys

import pytest
from pydicom.data import get_testdata_file
from pydicom.filereader import _read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.store.walk import MalformedDataSetError, walk
from tests.factories import ct_dataset
from tests.malformed import body, malformed_cases, well_formed_encapsulated

CASES = malformed_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_malformed_case_is_refused_with_its_reason(case) -> None:
    with pytest.raises(MalformedDataSetError) as info:
        walk(io.BytesIO(case.data), 0, len(case.data), case.transfer_syntax)
    assert case.reason in str(info.value)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_valid_data_set_passes_and_has_no_file_meta(syntax: str) -> None:
    data = body(ct_dataset(size=64), syntax)
    found = walk(io.BytesIO(data), 0, len(data), syntax)
    assert found.file_meta_ranges == [] and found.file_meta_tags == []


def test_properly_itemised_encapsulated_pixel_data_passes() -> None:
    data = well_formed_encapsulated(ct_dataset(size=64), b"\xff\xd8" + bytes(100) + b"\xff\xd9")
    walk(io.BytesIO(data), 0, len(data), "1.2.840.10008.1.2.4.50")


def test_group_0002_elements_are_located_for_removal() -> None:
    data = body(ct_dataset())
    uid = b"1.2.840.10008.1.2\x00"
    meta = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(uid)) + uid
    found = walk(io.BytesIO(b"PAD!" + meta + data), 4, 4 + len(meta) + len(data), ExplicitVRLittleEndian)
    assert found.file_meta_ranges == [(4, 4 + len(meta))]
    assert found.file_meta_tags == ["(0002,0010)"]


def test_nesting_is_bounded() -> None:
    item_start = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    nested = b"".join(b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + item_start for _ in range(40))
    with pytest.raises(MalformedDataSetError, match="nested deeper"):
        walk(io.BytesIO(nested), 0, len(nested), ExplicitVRLittleEndian)


@pytest.mark.parametrize("name", [
    "CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
    "test-SR.dcm", "liver_1frame.dcm", "waveform_ecg.dcm",
])
def test_real_files_pass(name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    with open(path, "rb") as fp:
        fp.seek(132)
        syntax = _read_file_meta_info(fp).TransferSyntaxUID
        walk(fp, fp.tell(), os.path.getsize(path), syntax)


def test_a_repeated_element_is_refused() -> None:
    data = body(ct_dataset())
    modality = data.index(b"\x08\x00\x60\x00CS")  # (0008,0060) Modality, explicit VR
    element = data[modality:modality + 8 + int.from_bytes(data[modality + 6:modality + 8], "little")]
    doubled = data[:modality] + element + data[modality:]
    with pytest.raises(MalformedDataSetError, match="repeated"):
        walk(io.BytesIO(doubled), 0, len(doubled), ExplicitVRLittleEndian)


def _empty_private_elements(count: int) -> bytes:
    return b"".join(struct.pack("<HHL", 0x0011 + (i >> 16) * 2, i & 0xFFFF, 0) for i in range(count))


def test_the_number_of_elements_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # dicom_node.store re-exports the function walk under the module's name
    monkeypatch.setattr(sys.modules["dicom_node.store.walk"], "MAX_ELEMENTS", 1000)
    data = _empty_private_elements(1000)
    walk(io.BytesIO(data), 0, len(data), ImplicitVRLittleEndian)
    data = _empty_private_elements(1001)
    with pytest.raises(MalformedDataSetError, match="more than 1000 elements"):
        walk(io.BytesIO(data), 0, len(data), ImplicitVRLittleEndian)


def test_private_and_unknown_tags_cost_no_dictionary_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom's miss path (KeyError, mask search) cost 20 us an element: 1M took 22-27 s."""
    import pydicom.datadict

    nested = body(ct_dataset(size=8), ImplicitVRLittleEndian)  # encoding it uses the dictionary

    def miss(*args: object) -> None:
        raise AssertionError("pydicom's dictionary lookup was used")

    for name in ("dictionary_VR", "get_entry", "mask_match"):
        monkeypatch.setattr(pydicom.datadict, name, miss)
    data = _empty_private_elements(2000) + struct.pack("<HHL", 0x6000, 0x3000, 0)
    walk(io.BytesIO(data), 0, len(data), ImplicitVRLittleEndian)
    walk(io.BytesIO(nested), 0, len(nested), ImplicitVRLittleEndian)

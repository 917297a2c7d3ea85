"""WADO-RS through dicomweb-client and plain HTTP, on an instance stored in every transfer syntax
the node accepts (``ingest.scp.TRANSFER_SYNTAXES``) and on a phantom study: instances byte for
byte as stored, metadata with bulk data URIs that resolve, frames native or as stored, 406 for a
transcoding the node does not do, and rendered previews."""

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
)

from dicom_node.ingest.scp import TRANSFER_SYNTAXES
from dicom_node.phantoms import write_study
from dicom_node.store.files import add_file_meta
from tests.dicomweb.multipart_body import parts
from tests.dicomweb.serve import serve_dicomweb
from tests.dicomweb.syntaxes import data_set, ingest, write
from tests.factories import new_uid

DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
LOSSLESS = {s for s in TRANSFER_SYNTAXES if not UID(s).is_encapsulated or "Lossless" in UID(s).name}


def sc_overlay() -> Dataset:
    """A colour Secondary Capture like the node's overlays: an RGB gradient."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, new_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.ConversionType = "PHANTOM^SC", "PHANTOM-SC", "OT", "WSD"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 48, 8, 8, 7, 0
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0] = np.arange(48) * 5
    rgb[..., 2] = 200
    ds.PixelData = rgb.tobytes()
    add_file_meta(ds)
    return ds


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Path], list[Path], Dataset]]:
    tmp = tmp_path_factory.mktemp("wado")
    files = {syntax: write(syntax, tmp / "src") for syntax in TRANSFER_SYNTAXES}
    study = write_study(tmp / "cr", 3, 41, size=64)
    with serve_dicomweb(tmp / "data") as (url, ctx):
        for path in [*files.values(), *study]:
            ingest(ctx.store, path)
        overlay = sc_overlay()
        ctx.store.save_result(overlay)
        yield url, files, study, overlay


def instance_url(url: str, ds: Dataset) -> str:
    return f"{url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def stored_frames(path: Path) -> list[bytes]:
    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    size = len(ds.PixelData) // int(ds.NumberOfFrames)
    native = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder("<")).tobytes()  # big endian swapped
    return [native[i * size:(i + 1) * size] for i in range(int(ds.NumberOfFrames))]


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES, ids=lambda s: UID(s).keyword)
def test_every_accepted_syntax_round_trips_byte_for_byte(server: tuple, syntax: str) -> None:
    url, files, _, _ = server
    path = files[syntax]
    ds = dcmread(path)
    client = DICOMwebClient(url=url)
    got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got.file_meta.TransferSyntaxUID == syntax and got.PixelData == ds.PixelData
    (headers, body), = parts(requests.get(instance_url(url, ds), headers={"Accept": DICOM}))
    assert headers["Content-Type"] == f"application/dicom; transfer-syntax={syntax}"
    assert body.endswith(data_set(path))  # the data set as C-STORE received it, byte for byte
    assert body == path.read_bytes()  # and the same file meta: the whole file as it was sent


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES, ids=lambda s: UID(s).keyword)
def test_metadata_sends_pixel_data_by_a_bulk_data_uri_that_resolves(server: tuple, syntax: str) -> None:
    url, files, _, _ = server
    ds = dcmread(files[syntax])
    client = DICOMwebClient(url=url)
    metadata = client.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    expected = ds.to_json_dict(bulk_data_threshold=2**31)
    del expected["7FE00010"]
    pixels = metadata.pop("7FE00010")
    assert metadata == expected
    assert pixels["BulkDataURI"] == f"{instance_url(url, ds)}/bulkdata/7FE00010" and "InlineBinary" not in pixels
    assert list(client.retrieve_bulkdata(pixels["BulkDataURI"])) == stored_frames(files[syntax])


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES, ids=lambda s: UID(s).keyword)
def test_frames_come_as_stored_or_native(server: tuple, syntax: str) -> None:
    url, files, _, _ = server
    ds = dcmread(files[syntax])
    client = DICOMwebClient(url=url)
    frames = list(client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                                  [2, 1]))
    stored = stored_frames(files[syntax])
    assert frames == [stored[1], stored[0]]
    native = requests.get(f"{instance_url(url, ds)}/frames/2",
                          headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    (headers, body), = parts(native)
    assert headers["Content-Type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    decoded = np.frombuffer(body, ds.pixel_array.dtype.newbyteorder("<")).reshape(ds.pixel_array.shape[1:])
    if syntax in LOSSLESS:
        assert np.array_equal(decoded, ds.pixel_array[1])
    else:  # lossy: what pydicom decodes from the same bitstream
        assert np.abs(decoded.astype(int) - ds.pixel_array[1].astype(int)).max() <= 1
    png = requests.get(f"{instance_url(url, ds)}/frames/2/rendered", headers={"Accept": "image/png"})
    assert cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_UNCHANGED).shape == (64, 64)


def test_a_study_and_a_series_come_whole_in_their_stored_syntax(server: tuple) -> None:
    url, _, study, _ = server
    client = DICOMwebClient(url=url)
    sources = {dcmread(p).SOPInstanceUID: p.read_bytes() for p in study}
    first = dcmread(study[0])
    for got in (client.retrieve_study(first.StudyInstanceUID),
                client.retrieve_series(first.StudyInstanceUID, first.SeriesInstanceUID)):
        assert sorted(ds.SOPInstanceUID for ds in got) == sorted(sources)
    bodies = [body for _, body in parts(requests.get(f"{url}/studies/{first.StudyInstanceUID}",
                                                     headers={"Accept": DICOM}))]
    assert sorted(dcmread(BytesIO(b)).SOPInstanceUID for b in bodies) == sorted(sources)
    for body in bodies:
        source = sources[dcmread(BytesIO(body)).SOPInstanceUID]
        assert body == source  # written as C-STORE stores it: the same file meta and data set
    metadata = client.retrieve_series_metadata(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert len(metadata) == 3 and all("BulkDataURI" in m["7FE00010"] for m in metadata)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian], ids=["explicit", "deflated"])
def test_a_large_binary_value_is_sent_by_a_bulk_data_uri_that_resolves(tmp_path: Path, syntax: str) -> None:
    ds = sc_overlay()
    document = bytes(range(256)) * 40  # 10 KiB, over the 4 KiB left inline
    ds.EncapsulatedDocument = document
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "doc.dcm"
    ds.save_as(path, enforce_file_format=True)
    with serve_dicomweb(tmp_path / "data") as (url, ctx):
        ingest(ctx.store, path)
        client = DICOMwebClient(url=url)
        metadata = client.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        uri = metadata["00420011"]["BulkDataURI"]
        assert metadata["00420011"]["vr"] == "OB" and "InlineBinary" not in metadata["00420011"]
        assert list(client.retrieve_bulkdata(uri)) == [document]
        assert list(client.retrieve_bulkdata(metadata["7FE00010"]["BulkDataURI"])) == [ds.PixelData]


def test_a_transcoding_the_node_does_not_do_is_406(server: tuple) -> None:
    url, files, _, _ = server
    native = dcmread(files[ExplicitVRLittleEndian], stop_before_pixels=True)
    jpeg_ls = dcmread(files[JPEGLSLossless], stop_before_pixels=True)
    answer = requests.get(instance_url(url, native), headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'})
    assert answer.status_code == 406 and "does not transcode" in answer.text
    assert requests.get(instance_url(url, native), headers={
        "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}'}).ok
    answer = requests.get(f"{instance_url(url, jpeg_ls)}/frames/1",
                          headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert answer.status_code == 406 and "image/jls" in answer.text
    (headers, _), = parts(requests.get(f"{instance_url(url, jpeg_ls)}/frames/1",
                                       headers={"Accept": 'multipart/related; type="image/jls"'}))
    assert headers["Content-Type"] == f"image/jls; transfer-syntax={JPEGLSLossless}"


def test_a_result_is_retrievable_as_an_input_is(server: tuple) -> None:
    url, _, _, overlay = server
    client = DICOMwebClient(url=url)
    got = client.retrieve_instance(overlay.StudyInstanceUID, overlay.SeriesInstanceUID, overlay.SOPInstanceUID)
    assert got.PixelData == overlay.PixelData
    metadata = client.retrieve_study_metadata(overlay.StudyInstanceUID)
    assert [m["00080018"]["Value"] for m in metadata] == [[overlay.SOPInstanceUID]]


def test_rendered_previews_an_overlay_and_a_grey_frame(server: tuple) -> None:
    url, files, _, overlay = server
    png = requests.get(f"{instance_url(url, overlay)}/rendered", headers={"Accept": "image/png"})
    assert png.headers["Content-Type"] == "image/png"
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(rgb, overlay.pixel_array)
    ct = dcmread(files[ExplicitVRLittleEndian], stop_before_pixels=True)
    jpeg = requests.get(f"{instance_url(url, ct)}/frames/2/rendered", params={"viewport": "32,32"})
    assert jpeg.headers["Content-Type"] == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(jpeg.content, np.uint8), cv2.IMREAD_UNCHANGED).shape == (32, 32)
    assert requests.get(f"{instance_url(url, ct)}/rendered", headers={"Accept": "image/gif"}).status_code == 406


def test_unknown_resources_are_404_and_malformed_ones_400(server: tuple) -> None:
    url, files, _, _ = server
    ct = dcmread(files[ExplicitVRLittleEndian], stop_before_pixels=True)
    assert requests.get(f"{url}/studies/1.2.3.4", headers={"Accept": DICOM}).status_code == 404
    assert requests.get(f"{instance_url(url, ct)}/frames/3").status_code == 404  # it has 2
    assert requests.get(f"{instance_url(url, ct)}/frames/1,x").status_code == 400
    assert requests.get(f"{instance_url(url, ct)}/bulkdata/00100010").status_code == 404
    assert requests.get(f"{url}/studies/1..2/metadata").status_code == 400

"""What WADO-RS makes of Accept headers, and of a file removed after it was indexed (a retention
purge racing a retrieve): an honest 404 before anything is sent, a cut connection after."""

from pathlib import Path

import pytest
import requests
from aiohttp.test_utils import make_mocked_request
from pydicom import dcmread

from dicom_node.dicomweb import negotiate
from dicom_node.phantoms import write_study
from tests.dicomweb.serve import serve_dicomweb
from tests.dicomweb.syntaxes import ingest

JLS = "1.2.840.10008.1.2.4.80"


def entries(header: str) -> list[negotiate.Acceptable]:
    return negotiate.parse(make_mocked_request("GET", "/", headers={"Accept": header}))


def test_parse_reads_types_quoted_parameters_and_drops_q_zero() -> None:
    found = entries('multipart/related; type="application/dicom"; transfer-syntax=*, '
                    'multipart/related;type=application/octet-stream;q=0, image/png;q=0.5')
    assert found == [negotiate.Acceptable("multipart/related", "application/dicom", "*"),
                     negotiate.Acceptable("image/png", "image/png", None)]
    assert entries("") == [negotiate.Acceptable("*/*", "*/*", None)]


@pytest.mark.parametrize("header, stored, media, expected", [
    ('multipart/related; type="application/octet-stream"', "1.2.840.10008.1.2", None, ("native", negotiate.NATIVE)),
    ('multipart/related; type="application/octet-stream"; transfer-syntax=*', JLS, "image/jls", ("stored", JLS)),
    ('multipart/related; type="application/octet-stream"', JLS, "image/jls", ("native", negotiate.NATIVE)),
    ('multipart/related; type="image/jls"', JLS, "image/jls", ("stored", JLS)),
    ('multipart/related; type="image/jp2"', JLS, "image/jls", None),
    ('multipart/related; type="image/jls"', "1.2.840.10008.1.2.1", None, None),
    ("*/*", JLS, "image/jls", ("stored", JLS)),
])
def test_frame_choice(header: str, stored: str, media: str | None, expected: tuple[str, str] | None) -> None:
    assert negotiate.frame_choice(entries(header), stored, media) == expected


def test_dicom_accepted_only_what_is_stored_or_any() -> None:
    assert negotiate.dicom_accepted(entries('multipart/related; type="application/dicom"'), {JLS})
    assert negotiate.dicom_accepted(entries(f'multipart/related; type="application/dicom"; transfer-syntax={JLS}'),
                                 {JLS})
    assert not negotiate.dicom_accepted(entries(f'multipart/related; type="application/dicom"; transfer-syntax={JLS}'),
                                     {JLS, negotiate.NATIVE})
    assert not negotiate.dicom_accepted(entries("application/json"), {JLS})


def test_a_file_removed_after_indexing_is_404_or_a_cut_connection(tmp_path: Path) -> None:
    paths = write_study(tmp_path / "src", 2, 51, size=64)
    with serve_dicomweb(tmp_path / "data") as (url, ctx):
        for path in paths:
            ingest(ctx.store, path)
        first, second = (dcmread(p, stop_before_pixels=True) for p in paths)
        (row,) = ctx.store.index.find("SELECT path FROM instance_keys WHERE sop_instance_uid = ?",
                                      (second.SOPInstanceUID,))
        (ctx.store.data_dir / str(row[0])).unlink()
        series = f"{url}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
        gone = f"{series}/instances/{second.SOPInstanceUID}"
        for resource in ("/metadata", "/frames/1", "/rendered"):
            answer = requests.get(gone + resource)
            assert answer.status_code == 404 and "cannot be read" in answer.text
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(series, headers={"Accept": 'multipart/related; type="application/dicom"'}).raise_for_status()

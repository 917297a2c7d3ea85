"""STOW-RS refusals: each bad part fails on its own with the DIMSE status C-STORE would give and
a reason; the HTTP status says whether all, some or none were stored; nothing half-written stays."""

import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import MRImageStorage

from dicom_node.ingest.status import StoreStatus
from tests.dicomweb.stow_helpers import (
    BOUNDARY,
    data_set_only,
    failures,
    leftovers,
    multipart,
    part10,
    part10_as_is,
    post,
    stored,
    stow_server,
)
from tests.factories import ct_dataset, new_uid


def test_mixed_parts_each_fail_with_their_reason_and_the_good_ones_are_stored(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    good, truncated, wrong_class, wrong_uid = (ct_dataset(seed=i) for i in range(4))
    cut = part10(truncated)
    wrong_class.file_meta.MediaStorageSOPClassUID = MRImageStorage
    wrong_uid.file_meta.MediaStorageSOPInstanceUID = new_uid()
    bare = data_set_only(ct_dataset(seed=9))  # no preamble, no meta
    parts = [part10(good), b"this is not DICOM at all", cut[: len(cut) - 100], part10_as_is(wrong_class),
             part10_as_is(wrong_uid), bare]
    with stow_server(data_dir) as (url, ctx, audit):
        response = post(url + "/studies", multipart(parts))
        records = ctx.store.index.instances()
    assert response.status_code == 202
    body = response.json()
    assert set(stored(body)) == {good.SOPInstanceUID} == {r.sop_instance_uid for r in records}
    reasons = failures(body)
    assert [(uid, status) for uid, status, _ in reasons] == [
        ("", StoreStatus.CANNOT_UNDERSTAND),
        (truncated.SOPInstanceUID, StoreStatus.CANNOT_UNDERSTAND),
        (wrong_class.SOPInstanceUID, StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
        (wrong_uid.SOPInstanceUID, StoreStatus.CANNOT_UNDERSTAND_UID_MISMATCH),
        ("", StoreStatus.CANNOT_UNDERSTAND),
    ]
    comments = [comment for _, _, comment in reasons]
    assert comments[0].startswith("not a DICOM Part 10 file")
    assert "runs past the end" in comments[1]
    assert comments[2] == "SOPClassUID differs from Media Storage SOP Class UID"
    assert comments[3] == "SOPInstanceUID differs from Media Storage SOP Instance UID"
    assert "File Meta Information" in comments[4]
    assert [e["sop_instance_uid"] for e in audit.named("instance_stored")] == [good.SOPInstanceUID]
    assert audit.named("stow_received")[0]["failed"] == 5
    assert leftovers(data_dir) == []


def test_dicomweb_client_sees_202_with_the_failed_instance(tmp_path: Path) -> None:
    good, other = ct_dataset(seed=1), ct_dataset(seed=2)
    other.file_meta.MediaStorageSOPInstanceUID = new_uid()
    with stow_server(tmp_path / "data") as (url, _, _):
        answer = DICOMwebClient(url).store_instances([good, other])
    [ok] = answer.ReferencedSOPSequence
    [failed] = answer.FailedSOPSequence
    assert ok.ReferencedSOPInstanceUID == good.SOPInstanceUID
    assert failed.ReferencedSOPInstanceUID == other.SOPInstanceUID
    assert failed.FailureReason == StoreStatus.CANNOT_UNDERSTAND_UID_MISMATCH
    assert failed.ErrorComment.startswith("SOPInstanceUID differs")


def test_an_instance_of_another_study_fails_under_post_studies_study(tmp_path: Path) -> None:
    study = new_uid()
    mine, stranger = ct_dataset(study=study, seed=1), ct_dataset(seed=2)
    with stow_server(tmp_path / "data") as (url, ctx, _):
        response = post(f"{url}/studies/{study}", multipart([part10(mine), part10(stranger)]))
        only_stranger = post(f"{url}/studies/{study}", multipart([part10(stranger)]))
        uids = {r.sop_instance_uid for r in ctx.store.index.instances()}
    assert response.status_code == 202
    body = response.json()
    assert set(stored(body)) == {mine.SOPInstanceUID} == uids
    assert failures(body) == [(stranger.SOPInstanceUID, StoreStatus.CANNOT_UNDERSTAND_STUDY_MISMATCH,
                               "StudyInstanceUID differs from the study in the request")]
    assert body["00081190"]["Value"][0].endswith(f"/dicom-web/studies/{study}")
    assert only_stranger.status_code == 409  # none stored
    assert "00081190" not in only_stranger.json() and only_stranger.json()["00081199"]["Value"] == []


def test_a_part_over_the_size_limit_is_413_and_the_rest_is_not_read(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    small, big, after = ct_dataset(size=8, seed=1), ct_dataset(size=256, seed=2), ct_dataset(size=8, seed=3)
    limit = 16 * 1024
    assert len(part10(small)) < limit < len(part10(big)) - 2**16
    with stow_server(data_dir, max_instance_size=limit) as (url, ctx, _):
        response = post(url + "/studies", multipart([part10(small), part10(big), part10(after)]))
        uids = {r.sop_instance_uid for r in ctx.store.index.instances()}
    assert response.status_code == 413
    body = response.json()
    assert set(stored(body)) == {small.SOPInstanceUID} == uids  # stored before the big one: durable
    [(_, status, comment)] = failures(body)
    assert status == StoreStatus.OUT_OF_RESOURCES_INSTANCE_TOO_LARGE and str(limit) in comment
    assert leftovers(data_dir) == []


def test_over_max_parts_is_413_with_what_was_stored_and_the_rest_is_not_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.dicomweb import stow

    assert stow.MAX_PARTS == 10_000  # documented in docs/conformance.md
    monkeypatch.setattr(stow, "MAX_PARTS", 3)
    instances = [ct_dataset(size=8, seed=20 + n) for n in range(5)]
    with stow_server(tmp_path / "data") as (url, ctx, _):
        response = post(url + "/studies", multipart([part10(ds) for ds in instances]))
        assert ctx.store.index.counts()[2] == 3
    assert response.status_code == 413
    body = response.json()
    assert list(stored(body)) == [ds.SOPInstanceUID for ds in instances[:3]]
    [(uid, status, comment)] = failures(body)
    assert (uid, status) == ("", StoreStatus.OUT_OF_RESOURCES) and "over 3 parts" in comment


def test_a_data_set_just_over_the_limit_is_refused_by_the_backstop(tmp_path: Path) -> None:
    """A part within the meta allowance but whose data set passes the limit: 0xA701 as C-STORE."""
    ds = ct_dataset(size=64, seed=1)
    limit = len(part10(ds)) - 400  # the data set alone is over it, the part under limit + 64 KiB
    with stow_server(tmp_path / "data", max_instance_size=limit) as (url, ctx, _):
        response = post(url + "/studies", multipart([part10(ds)]))
        assert ctx.store.index.instances() == []
    assert response.status_code == 409
    assert failures(response.json())[0][1] == StoreStatus.OUT_OF_RESOURCES_INSTANCE_TOO_LARGE


@pytest.mark.parametrize(("content_type", "status"), [
    ("application/dicom", 415),
    ("application/json", 415),
    (f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', 415),
    (f"multipart/related; boundary={BOUNDARY}", 415),
    ('multipart/related; type="application/dicom"', 400),
])
def test_a_request_that_is_not_stow_of_part10_files_is_refused_whole(
        tmp_path: Path, content_type: str, status: int) -> None:
    with stow_server(tmp_path / "data") as (url, ctx, _):
        response = post(url + "/studies", multipart([part10(ct_dataset())]), content_type=content_type)
        assert ctx.store.index.instances() == []
    assert response.status_code == status


def test_empty_and_malformed_bodies_and_bad_study_uids_are_400(tmp_path: Path) -> None:
    with stow_server(tmp_path / "data") as (url, ctx, _):
        assert post(url + "/studies", f"--{BOUNDARY}--\r\n".encode()).status_code == 400
        assert post(url + "/studies", b"no boundary anywhere").status_code == 400
        assert post(url + "/studies/1.2.abc", multipart([part10(ct_dataset())])).status_code == 400
        assert ctx.store.index.instances() == []


def test_a_part_of_another_media_type_fails_alone(tmp_path: Path) -> None:
    with stow_server(tmp_path / "data") as (url, _, _):
        response = post(url + "/studies", multipart([b"{}"], part_type="application/json"))
    assert response.status_code == 409
    [(_, status, comment)] = failures(response.json())
    assert status == StoreStatus.CANNOT_UNDERSTAND and "application/json" in comment


def test_a_transfer_syntax_c_store_would_not_negotiate_fails_with_c122(tmp_path: Path) -> None:
    explicit = b"1.2.840.10008.1.2.1\x00"
    encoded = part10(ct_dataset())
    assert encoded.count(explicit) == 1  # the meta's Transfer Syntax UID, nothing else
    encoded = encoded.replace(explicit, b"1.2.840.10008.1.2.3\x00")  # no such syntax
    with stow_server(tmp_path / "data") as (url, _, _):
        response = post(url + "/studies", multipart([encoded]))
    assert response.status_code == 409
    assert failures(response.json())[0][1] == StoreStatus.TRANSFER_SYNTAX_NOT_SUPPORTED == 0xC122


def test_a_sop_class_c_store_would_not_negotiate_fails_with_0122(tmp_path: Path) -> None:
    """What C-STORE negotiates is what STOW-RS takes: not a private UID, not a C-FIND class."""
    odd, find, retired = ct_dataset(seed=1), ct_dataset(seed=2), ct_dataset(seed=3)
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = "1.2.3.4"
    find.SOPClassUID = find.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    # US Image Storage (retired): C-STORE takes it, so STOW-RS does too
    retired.SOPClassUID = retired.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6"
    with stow_server(tmp_path / "data") as (url, ctx, _):
        response = post(url + "/studies", multipart([part10(odd), part10(find), part10(retired)]))
        assert ctx.store.index.counts()[2] == 1
    assert response.status_code == 202
    failed = failures(response.json())
    assert [(uid, reason) for uid, reason, _ in failed] == [
        (odd.SOPInstanceUID, StoreStatus.SOP_CLASS_NOT_SUPPORTED), (find.SOPInstanceUID, 0x0122)]
    assert all("not a storage SOP class" in comment for _, _, comment in failed)
    assert list(stored(response.json())) == [retired.SOPInstanceUID]


@pytest.mark.parametrize("tail", [b"\r\n", b""])
def test_a_body_without_its_closing_delimiter_is_400_either_way(tmp_path: Path, tail: bytes) -> None:
    """With or without the CRLF after the last part, a body cut before "--boundary--" is one
    answer: 400, nothing stored (aiohttp had cut the part in one case and kept it in the other)."""
    body = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part10(ct_dataset(seed=5)) + tail
    with stow_server(tmp_path / "data") as (url, ctx, _):
        response = post(url + "/studies", body)
        assert ctx.store.index.counts()[2] == 0
    assert response.status_code == 400 and "closing delimiter" in response.text
    assert leftovers(tmp_path / "data") == []


def test_a_client_that_goes_away_mid_part_leaves_nothing_behind(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    body = multipart([part10(ct_dataset(size=512))])
    with stow_server(data_dir) as (url, ctx, _):
        host, port = urlsplit(url).hostname, urlsplit(url).port
        with socket.create_connection((str(host), int(port or 0)), timeout=10) as sock:
            sock.sendall((f"POST /dicom-web/studies HTTP/1.1\r\nHost: {host}\r\n"
                          f"Content-Type: multipart/related; type=\"application/dicom\"; boundary={BOUNDARY}\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n").encode() + body[: len(body) // 2])
            assert poll(lambda: bool(leftovers(data_dir)))  # the part is being received into tmp/
        assert poll(lambda: not leftovers(data_dir)), leftovers(data_dir)  # and removed once it is gone
        assert ctx.store.index.instances() == []


def poll(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_boundaries_longer_than_rfc_2046_allows_are_read_as_orthanc_sends_them(tmp_path: Path) -> None:
    """Orthanc's DICOMweb plugin sends a 73-character boundary; past 200 the request is refused."""
    ds = ct_dataset()
    with stow_server(tmp_path / "data") as (url, ctx, _):
        for length, status in ((73, 200), (201, 400)):
            boundary = "b" * length
            body = multipart([part10(ds)]).replace(BOUNDARY.encode(), boundary.encode())
            response = post(url + "/studies", body,
                            content_type=f'multipart/related; type="application/dicom"; boundary={boundary}')
            assert response.status_code == status, response.text
        assert [r.sop_instance_uid for r in ctx.store.index.instances()] == [ds.SOPInstanceUID]

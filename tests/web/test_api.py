"""The dashboard's JSON API, pages, /metrics, /healthz and /readyz on a node that did real work."""

import re

from tests.web.conftest import TOKEN, Served


def test_health_and_readiness_need_no_token(served: Served) -> None:
    assert served.get("/healthz", token=None)[:1] == (200,)
    status, _, body = served.get("/readyz", token=None)
    assert status == 200 and body == b"ready\n"


def test_everything_else_needs_the_token(served: Served) -> None:
    for path in ("/", "/api/overview", "/metrics", "/studies"):
        assert served.get(path, token=None)[0] == 401
        assert served.get(path, token="wrong")[0] == 401
    import http.cookiejar
    import urllib.request

    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with browser.open(f"{served.base}/?token={TOKEN}", timeout=30) as response:  # logs in once: a cookie
        assert response.status == 200 and "token" not in response.url  # and the token leaves the URL
    with browser.open(f"{served.base}/jobs", timeout=30) as response:
        assert response.status == 200


def test_cross_site_posts_and_foreign_host_names_are_refused(served: Served) -> None:
    import urllib.request

    [failed] = served.api("/jobs?state=failed") or [{"id": 1}]
    for headers, code in (({"Origin": "http://evil.example"}, 403), ({"Sec-Fetch-Site": "cross-site"}, 403),
                          ({"Host": "rebound.example:8080"}, 421)):
        request = urllib.request.Request(f"{served.base}/jobs/{failed['id']}/requeue", method="POST",
                                         headers={"Authorization": f"Bearer {TOKEN}", **headers})
        try:
            urllib.request.urlopen(request, timeout=30)
            raise AssertionError(f"{headers} was let through")
        except urllib.error.HTTPError as exc:
            assert exc.code == code, headers
    assert served.get("/api/jobs?state=bogus")[0] == 400
    assert served.get("/api/jobs/99999")[0] == 404


def test_overview_and_study_show_what_the_node_did(served: Served) -> None:
    overview = served.api("/overview")
    assert overview["studies"] == 2 and overview["instances"] == 2
    assert overview["jobs"].get("done") == 1 and sum(overview["jobs"].values()) == 2
    assert overview["outbox"] == {"pending": 4}  # 2 overlays and 2 SRs, waiting for a PACS that is down
    assert "demo-cxr" in [m["name"] for m in overview["models"]] and overview["devices"] == ["cpu"]
    assert any("meant for modalities" in e["reason"] for e in overview["last_errors"])
    found = served.api(f"/studies?q={served.cr_study[-12:]}")
    assert [s["study_instance_uid"] for s in found] == [served.cr_study]
    study = served.api(f"/studies/{served.cr_study}")
    [series] = study["series"]
    [job] = series["jobs"]
    assert job["state"] == "done" and {"inference", "explain", "encode"} <= set(job["timings"])
    assert sorted(job["results"]["predictions"][0]["positives"]) == ["effusion", "nodule"]
    assert {d["state"] for d in study["deliveries"]} == {"pending"} and len(study["deliveries"]) == 3
    assert served.get("/api/studies/1.2.3.4")[0] == 404


def test_pages_and_overlay_previews(served: Served) -> None:
    status, kind, body = served.get(f"/studies/{served.cr_study}")
    assert status == 200 and kind.startswith("text/html")
    html = body.decode()
    assert "nodule" in html and "AI results are unverified" in html
    previews = re.findall(r"src='(/preview/[0-9./]+\.png)'", html)
    assert len(previews) == 2  # the Grad-CAM overlays of the two positive findings
    status, kind, png = served.get(previews[0])
    assert status == 200 and kind == "image/png" and png.startswith(b"\x89PNG")
    assert int.from_bytes(png[16:20], "big") == 512  # IHDR width: the overlay's own, under 640
    for path in ("/", "/jobs", "/outbox", "/models", "/models/demo-cxr", "/studies"):
        assert served.get(path)[0] == 200, path
    assert "Explanations" in served.get("/models/demo-cxr")[2].decode()  # the model card


def test_metrics_in_prometheus_format(served: Served) -> None:
    status, kind, body = served.get("/metrics")
    text = body.decode()
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    assert 'dicom_node_instances_received_total{calling_ae="MODALITY"} 2.0' in text
    assert 'dicom_node_jobs{state="done"} 1.0' in text and 'dicom_node_outbox{state="pending"} 4.0' in text
    assert 'dicom_node_job_step_seconds_count{step="inference"} 1.0' in text
    assert 'dicom_node_associations_total{result="accepted"}' in text
    for line in text.splitlines():  # every sample line parses: name{labels} value
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? -?[0-9.e+-]+", line), line


def test_requeue_from_the_api_changes_the_jobs_state(served: Served) -> None:
    [failed] = served.api("/jobs?state=failed")
    import urllib.request

    request = urllib.request.Request(
        f"{served.base}/api/jobs/{failed['id']}/requeue",
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    assert served.api(f"/jobs/{failed['id']}")["state"] in ("queued", "running", "failed")


def test_retry_from_the_api_answers_the_record_it_retried(served: Served) -> None:
    import json
    import urllib.request

    records = served.api("/outbox")
    oldest = min(records, key=lambda r: r["id"])
    assert oldest["state"] == "pending"
    request = urllib.request.Request(f"{served.base}/api/outbox/{oldest['id']}/retry", method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("a pending record cannot be retried")
    except urllib.error.HTTPError as exc:
        assert exc.code == 409 and "pending already" in json.loads(exc.read())["error"]

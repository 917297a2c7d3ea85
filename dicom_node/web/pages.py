"""Server-rendered HTML pages: one small, consistent look, no front-end build step."""

import time
from html import escape
from typing import Any

from dicom_node.explain.quality import plain_reading

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#14213d;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:center}
header a{color:#dfe6f3;text-decoration:none}header a:hover{color:#fff}header b{font-size:16px}
main{padding:16px 24px;max-width:1400px}h1{font-size:20px;margin:8px 0 16px}
h2{font-size:16px;margin:20px 0 8px}
table{border-collapse:collapse;background:#fff;margin-bottom:12px;width:100%}
td,th{border-bottom:1px solid #e3e6ea;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}.uid{font-family:ui-monospace,monospace;font-size:12px}
.state{padding:1px 7px;border-radius:9px;font-size:12px;background:#e3e6ea}
.done,.delivered{background:#d4f1dd}.failed,.dead,.unconfirmed{background:#f8d3d3}.queued,.pending,.running{background:#fdf0c4}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:12px}
.card{background:#fff;border:1px solid #e3e6ea;border-radius:6px;padding:10px 14px;min-width:130px}
.card b{display:block;font-size:22px}.banner{background:#fff3cd;border:1px solid #e0c36a;padding:6px 10px;
margin-bottom:12px}.previews{display:flex;gap:12px;flex-wrap:wrap}.previews figure{margin:0;background:#fff;
border:1px solid #e3e6ea;padding:6px}.previews img{width:320px;display:block}button{cursor:pointer}
.notice{background:#d4f1dd;border:1px solid #7cc895;padding:6px 10px}
.alert{background:#f8d3d3;border:1px solid #c0392b;padding:6px 10px;margin-bottom:12px}
pre{background:#fff;border:1px solid #e3e6ea;padding:10px;overflow:auto;white-space:pre-wrap}
"""
NAV = (
    ("/", "Overview"),
    ("/studies", "Studies"),
    ("/jobs", "Jobs"),
    ("/outbox", "Outbox"),
    ("/models", "Models"),
    ("/actors", "Actors"),
)


def when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def state(value: str) -> str:
    return f'<span class="state {escape(value)}">{escape(value)}</span>'


def page(title: str, body: str) -> bytes:
    nav = "".join(f'<a href="{href}">{name}</a>' for href, name in NAV)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)} · dicom-node</title>"
        f"<style>{STYLE}</style></head><body><header><b>dicom-node</b>{nav}</header><main>"
        f"<div class='banner'>AI results are unverified and not for diagnostic use.</div>"
        f"<h1>{escape(title)}</h1>{body}</main></body></html>"
    ).encode()


def table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body or '<tr><td colspan=99>none</td></tr>'}</table>"


def study_link(uid: str) -> str:
    return f"<a class='uid' href='/studies/{escape(uid)}'>{escape(uid)}</a>"


def button(action: str, label: str) -> str:
    return (
        f'<form method="post" action="{escape(action)}" style="display:inline">'
        f"<button>{escape(label)}</button></form>"
    )


def readiness(r: dict[str, Any]) -> str:
    """A red banner while the node is not ready (a full disk refuses every C-STORE), and the
    free space either way."""
    free = r["free_bytes"]
    space = (f"Free space on data_dir: {free / 2**30:.2f} GiB (floor {r['min_free_space'] / 2**30:.2f} GiB)."
             if free is not None else "Free space on data_dir: unknown.")
    if r["ready"]:
        return f"<p class='disk'>{escape(space)}</p>"
    reasons = "; ".join(r["reasons"])
    return f"<div class='alert'><b>Not ready:</b> {escape(reasons)}. {escape(space)}</div>"


def overview(o: dict[str, Any]) -> bytes:
    cards = [
        ("studies", o["studies"]),
        ("series", o["series"]),
        ("instances", o["instances"]),
        ("GiB received", f"{o['bytes'] / 2**30:.2f}"),
        ("instances, last hour", o["last_hour"]["instances_received"]),
        ("jobs done, last hour", o["last_hour"]["jobs_done"]),
        ("results delivered, last hour", o["last_hour"]["results_delivered"]),
    ]
    body = readiness(o["readiness"]) + (
        "<div class='cards'>"
        + "".join(f"<div class='card'><b>{escape(str(v))}</b>{escape(k)}</div>" for k, v in cards)
        + "</div>"
    )
    body += "<h2>Jobs</h2>" + table(
        ["state", "count"], [[state(k), str(v)] for k, v in sorted(o["jobs"].items())]
    )
    body += "<h2>Outbox</h2>" + table(
        ["state", "count"], [[state(k), str(v)] for k, v in sorted(o["outbox"].items())]
    )
    body += "<h2>Last errors</h2>" + table(
        ["when", "what", "state", "study", "reason"],
        [
            [
                when(e["updated_at"]),
                f"{e['kind']} {e['id']}",
                state(e["state"]),
                study_link(e["study_instance_uid"]),
                escape(e["reason"]),
            ]
            for e in o["last_errors"]
        ],
    )
    body += "<h2>Models</h2>" + table(
        ["model", "version", "architecture"],
        [
            [
                f"<a href='/models/{escape(m['name'])}'>{escape(m['name'])}</a>",
                escape(m["version"]),
                escape(m["architecture"]),
            ]
            for m in o["models"]
        ],
    )
    body += f"<p>Devices in use: {escape(', '.join(o['devices']))}</p>"
    return page("Overview", body)


def studies(rows: list[dict[str, Any]], query: str) -> bytes:
    form = (
        f"<form method='get'><input name='q' value='{escape(query)}' placeholder='Study or Series UID' "
        f"size=60> <button>Search</button></form>"
    )
    return page(
        "Studies",
        form
        + table(
            ["study", "last received", "modalities", "series", "instances", "jobs"],
            [
                [
                    study_link(r["study_instance_uid"]),
                    when(r["last_received_at"]),
                    escape(r["modalities"] or ""),
                    str(r["series"]),
                    str(r["instances"]),
                    " ".join(state(s) for s in (r["job_states"] or "").split(",") if s),
                ]
                for r in rows
            ],
        ),
    )


def _gate(results: dict[str, Any]) -> str:
    """The input-distribution gate: the outcome when it abstained, each frame's score and threshold."""
    gate = results.get("gate")
    if not gate:
        return ""
    outcome = (f"<p class='notice'>{escape(results['outcome'])}: "
               f"{escape(results.get('outcome_reason', ''))}</p>" if results.get("outcome") else "")
    rows = [
        [f"<span class='uid'>{escape(f['sop_instance_uid'])}</span> #{f['frame'] + 1}", f"{f['score']:.3f}",
         f"{gate['threshold']:.3f}", "<b>outside the validated input</b>" if f["outside"] else "within"]
        for f in gate["frames"]
    ]
    return (f"<h2>Input distribution</h2>{outcome}"
            + table(["image", "out-of-distribution score", "threshold", ""], rows))


def _predictions(job: dict[str, Any]) -> str:
    results = job.get("results") or {}
    rows = [
        [
            f"<span class='uid'>{escape(p['sop_instance_uid'])}</span> #{p['frame'] + 1}",
            escape(label),
            f"{probability:.3f}",
            "<b>positive</b>" if label in p["positives"] else "",
        ]
        for p in results.get("predictions", [])
        for label, probability in p["probabilities"].items()
    ]
    out = _gate(results) + "<h2>Predictions</h2>" + table(["image", "label", "probability", ""], rows)
    quality = [
        [
            escape(e["label"]),
            escape(e["method"]),
            escape(e.get("verdict", "not shown to be faithful")),
            "<br>".join(escape(line) for line in plain_reading(e["quality"])),
            ", ".join(f"{escape(k)} {v:.3f}" for k, v in sorted(e["quality"].items())),
        ]
        for e in results.get("explanations", [])
    ]
    return (
        out
        + "<h2>Explanations and their quality figures</h2>"
        + table(["label", "method", "verdict", "reading", "figures"], quality)
    )


def study(s: dict[str, Any]) -> bytes:
    body = f"<p class='notice' id='notice'>{escape(s['notice'])}</p>" if s.get("notice") else ""
    body += f"<p class='uid'>{escape(s['study_instance_uid'])}</p>"
    for series in s["series"]:
        body += (
            f"<h2>Series {escape(series['modality'])} {escape(series['series_description'] or '')}</h2>"
            f"<p class='uid'>{escape(series['series_instance_uid'])} · {series['instances']} instance(s) "
            f"from {escape(series['calling_ae_title'])} · {escape(series['manufacturer'])}</p>"
        )
        for job in series["jobs"]:
            timings = ", ".join(f"{escape(k)} {v:.2f} s" for k, v in job["timings"].items())
            action = (
                button(f"/jobs/{job['id']}/requeue", "Requeue")
                if job["state"] in ("failed", "dead", "done")
                else ""
            )
            body += table(
                ["job", "pipeline", "state", "attempts", "reason", "step timings", ""],
                [
                    [
                        str(job["id"]),
                        escape(job["pipeline"]),
                        state(job["state"]),
                        str(job["attempts"]),
                        escape(job["reason"]),
                        timings,
                        action,
                    ]
                ],
            )
            body += _predictions(job)
            overlays = [
                o
                for o in (job.get("results") or {}).get("outputs", [])
                if o["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.7"
            ]
            if overlays:
                body += (
                    "<h2>Overlays</h2><div class='previews'>"
                    + "".join(
                        f"<figure><img alt='overlay' src='/preview/{escape(s['study_instance_uid'])}/"
                        f"{escape(o['series_instance_uid'])}/{escape(o['sop_instance_uid'])}.png'>"
                        f"<figcaption>{escape(o['series_description'])}</figcaption></figure>"
                        for o in overlays
                    )
                    + "</div>"
                )
    body += "<h2>Delivery</h2>" + table(
        ["result", "destination", "state", "attempts", "reason", "delivered"],
        [
            [
                f"<span class='uid'>{escape(d['sop_instance_uid'])}</span>",
                escape(d["destination"]),
                state(d["state"]),
                str(d["attempts"]),
                escape(d["reason"]),
                when(d["delivered_at"]),
            ]
            for d in s["deliveries"]
        ],
    )
    return page("Study", body)


def jobs(rows: list[dict[str, Any]]) -> bytes:
    return page(
        "Jobs",
        table(
            ["id", "state", "outcome", "pipeline", "version", "study", "attempts", "updated", "reason", ""],
            [
                [
                    str(j["id"]),
                    state(j["state"]),
                    escape(j.get("outcome", "-")),
                    escape(j["pipeline"]),
                    f"v{j['version']} " + ("<b>current</b>" if j.get("current") else "superseded"),
                    study_link(j["study_instance_uid"]),
                    str(j["attempts"]),
                    when(j["updated_at"]),
                    escape(j["reason"]),
                    button(f"/jobs/{j['id']}/requeue", "Requeue")
                    if j["state"] in ("failed", "dead", "done")
                    else "",
                ]
                for j in rows
            ],
        ),
    )


def outbox(rows: list[dict[str, Any]]) -> bytes:
    return page(
        "Outbox",
        table(
            ["id", "state", "destination", "result", "attempts", "sends", "updated", "reason", ""],
            [
                [
                    str(r["id"]),
                    state(r["state"]),
                    escape(r["destination"]),
                    f"<span class='uid'>{escape(r['sop_instance_uid'])}</span>",
                    str(r["attempts"]),
                    str(r["sends"]),
                    when(r["updated_at"]),
                    escape(r["reason"]),
                    button(f"/outbox/{r['id']}/retry", "Retry") if r["state"] != "pending" else "",
                ]
                for r in rows
            ],
        ),
    )


def models(rows: list[dict[str, Any]]) -> bytes:
    return page(
        "Models",
        table(
            ["model", "version", "architecture", "labels", "for", "sha256"],
            [
                [
                    f"<a href='/models/{escape(m['name'])}'>{escape(m['name'])}</a>",
                    escape(m["version"]),
                    escape(m["architecture"]),
                    escape(", ".join(label["name"] for label in m["labels"])),
                    escape(", ".join(m["modalities"]) or "any"),
                    f"<span class='uid'>{escape(m['sha256'][:16])}</span>",
                ]
                for m in rows
            ],
        ),
    )


def actors(rows: list[dict[str, Any]]) -> bytes:
    """The Ray executor's actors ("none" with the local executor)."""
    if not rows:
        return page("Actors", "<p>None: this node runs its models itself (workers.executor = local).</p>")
    return page("Actors", table(
        ["model", "slot", "alive", "device", "host", "pid", "busy", "queue depth", "utilisation", "jobs",
         "failures", "load s", "problem"],
        [[escape(str(a[k])) for k in ("model", "slot", "alive", "device", "host", "pid", "busy",
                                       "queue_depth")] + [f"{a['utilisation']:.0%}", str(a["jobs"]),
                                                          str(a["failures"]), str(a["load_seconds"]),
                                                          escape(str(a.get("problem", "")))]
         for a in rows]))


def model(m: dict[str, Any]) -> bytes:
    return page(
        f"Model {m['name']} {m['version']}",
        f"<h2>Manifest</h2><pre>{escape(m['manifest'])}</pre>"
        f"<h2>Model card</h2><pre>{escape(m['model_card'] or 'no MODEL_CARD.md')}</pre>",
    )


def not_found(what: str) -> bytes:
    return page("Not found", f"<p>{escape(what)}</p>")

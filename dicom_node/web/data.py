"""What the dashboard and the JSON API show: plain dicts read from the node's database and
folders. The same functions serve the HTML pages and ``/api``; actions call the same core
functions as the CLI (``JobQueue.requeue``, ``Outbox.retry``)."""

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dicom_node.export import Outbox
from dicom_node.inference import ModelRegistry
from dicom_node.jobs.queue import JobQueue
from dicom_node.store.db import DATABASE_NAME, connect_read_only
from dicom_node.web.health import Readiness, readiness


@dataclass
class Sources:
    """What a running node hands to its web server."""

    data_dir: Path
    queue: JobQueue
    outbox: Outbox
    registry: ModelRegistry
    devices: list[str]
    ready: Callable[[], str | None]  # None when ready, else why not
    min_free_space: int = 0  # store.min_free_space: below it the node refuses every C-STORE
    actors: Callable[[], list[dict[str, Any]]] = list  # the Ray executor's actors (none when local)


@contextmanager
def read_only(data_dir: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the node's database (works on a full disk), closed on exit."""
    conn = connect_read_only(data_dir / DATABASE_NAME)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def overview(src: Sources) -> dict[str, Any]:
    hour_ago = time.time() - 3600
    with read_only(src.data_dir) as conn:
        counts = conn.execute(
            "SELECT (SELECT COUNT(*) FROM studies), (SELECT COUNT(*) FROM series), "
            "(SELECT COUNT(*) FROM instances), (SELECT COALESCE(SUM(size_bytes), 0) "
            "FROM instances)"
        ).fetchone()
        jobs = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        received = conn.execute(
            "SELECT COUNT(*) FROM instances WHERE received_at >= ?", (hour_ago,)
        ).fetchone()[0]
        finished = conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE state = 'done' AND finished_at >= ?", (hour_ago,)
        ).fetchone()[0]
        delivered = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE state = 'delivered' AND delivered_at >= ?", (hour_ago,)
        ).fetchone()[0]
        errors = [
            dict(r)
            for r in conn.execute(
                "SELECT 'job' AS kind, id, state, reason, updated_at, study_instance_uid FROM jobs "
                "WHERE state IN ('failed', 'dead') UNION ALL "
                "SELECT 'result', id, state, reason, updated_at, study_instance_uid FROM outbox "
                "WHERE state IN ('dead', 'unconfirmed') "
                "ORDER BY updated_at DESC LIMIT 10"
            ).fetchall()
        ]
    return {
        "studies": counts[0],
        "series": counts[1],
        "instances": counts[2],
        "bytes": counts[3],
        "jobs": jobs,
        "outbox": src.outbox.counts(),
        "last_errors": errors,
        "last_hour": {"instances_received": received, "jobs_done": finished, "results_delivered": delivered},
        "models": [
            {"name": m.name, "version": m.version, "architecture": m.architecture}
            for m in (src.registry.manifest(n) for n in src.registry.names())
        ],
        "devices": src.devices,
        "readiness": ready(src).as_dict(),
    }


def ready(src: Sources) -> Readiness:
    """``/readyz``'s answer: the node's own and the free space on ``data_dir``."""
    return readiness(src.ready, src.data_dir, src.min_free_space)


def studies(src: Sources, query: str = "", limit: int = 200) -> list[dict[str, Any]]:
    """Studies, newest first; ``query`` matches a part of the Study or Series Instance UID."""
    like = f"%{query}%"
    with read_only(src.data_dir) as conn:
        rows = conn.execute(
            "SELECT s.study_instance_uid, s.first_received_at, s.last_received_at, "
            "COUNT(DISTINCT r.series_instance_uid) AS series, "
            "GROUP_CONCAT(DISTINCT r.modality) AS modalities, "
            "(SELECT COUNT(*) FROM instances i WHERE i.study_instance_uid = s.study_instance_uid) "
            "AS instances, (SELECT GROUP_CONCAT(DISTINCT j.state) FROM jobs j "
            "WHERE j.study_instance_uid = s.study_instance_uid) "
            "AS job_states FROM studies s JOIN series r ON r.study_instance_uid = s.study_instance_uid "
            "WHERE s.study_instance_uid LIKE ? OR r.series_instance_uid LIKE ? "
            "GROUP BY s.study_instance_uid ORDER BY s.last_received_at DESC LIMIT ?",
            (like, like, limit),
        ).fetchall()
    return [dict(r) for r in rows]


def study(src: Sources, uid: str) -> dict[str, Any] | None:
    """One study: its series, each series' jobs (state, timings, predictions, explanations,
    outputs) and the delivery of every result."""
    with read_only(src.data_dir) as conn:
        head = conn.execute("SELECT * FROM studies WHERE study_instance_uid = ?", (uid,)).fetchone()
        if head is None:
            return None
        series = [
            dict(r)
            for r in conn.execute(
                "SELECT series_instance_uid, modality, body_part_examined, series_description, manufacturer, "
                "calling_ae_title, last_received_at, (SELECT COUNT(*) FROM instances i WHERE "
                "i.study_instance_uid = r.study_instance_uid AND "
                "i.series_instance_uid = r.series_instance_uid) AS instances FROM series r "
                "WHERE study_instance_uid = ? ORDER BY first_received_at",
                (uid,),
            ).fetchall()
        ]
        job_ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM jobs WHERE study_instance_uid = ? ORDER BY id", (uid,)
            ).fetchall()
        ]
        deliveries = [
            dict(r)
            for r in conn.execute(
                "SELECT id, sop_instance_uid, sop_class_uid, destination, state, attempts, sends, reason, "
                "delivered_at "
                "FROM outbox WHERE study_instance_uid = ? ORDER BY id",
                (uid,),
            ).fetchall()
        ]
    jobs = [record_dict(j) for j in (src.queue.get(i) for i in job_ids) if j is not None]
    for s in series:
        s["jobs"] = [j for j in jobs if j["series_instance_uid"] == s["series_instance_uid"]]
    return {
        "study_instance_uid": uid,
        "first_received_at": head["first_received_at"],
        "last_received_at": head["last_received_at"],
        "series": series,
        "deliveries": deliveries,
    }


def result_path(data_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    from dicom_node.store.files import check_uid

    parts = [check_uid("study", study_uid), check_uid("series", series_uid), check_uid("instance", sop_uid)]
    return data_dir / "results" / parts[0] / parts[1] / f"{parts[2]}.dcm"


def models(src: Sources) -> list[dict[str, Any]]:
    out = []
    for name in src.registry.names():
        m = src.registry.manifest(name)
        card = m.path.parent / "MODEL_CARD.md"
        out.append(
            {
                "name": m.name,
                "version": m.version,
                "architecture": m.architecture,
                "sha256": m.sha256,
                "cam_layer": m.cam_layer,
                "intended_use": m.intended_use,
                "input": asdict(m.input),
                "labels": [
                    {"name": label.name, "threshold": label.threshold, "code": label.code}
                    for label in m.labels
                ],
                "modalities": list(m.modalities),
                "body_parts": list(m.body_parts),
                "model_card": card.read_text() if card.exists() else "",
                "manifest": m.path.read_text(),
            }
        )
    return out


def jobs(src: Sources, state: str | None, limit: int = 200) -> list[dict[str, Any]]:
    from dicom_node.export.outcome import describe_job
    from dicom_node.jobs.queue import JobState

    listed = src.queue.list(JobState(state) if state else None, limit)
    sent = src.outbox.for_jobs([j.id for j in listed])  # "not analysed, reported" vs "nothing sent"
    current = src.queue.current(listed)
    # current: the newest version of its series and pipeline; its results supersede the others'
    held = held_back(src.actors())
    return [record_dict(j) | {"outcome": describe_job(j.state, sent.get(j.id, []), j.results),
                              "current": j.id in current,
                              "reason": waiting_reason(j.reason, held.get(j.model))
                              if j.state == JobState.QUEUED else j.reason} for j in listed]


def held_back(actors: list[dict[str, Any]]) -> dict[str, str]:
    """Why each model with no live Ray actor holds back its queued jobs (none with the local
    executor): the workers claim none of them, so their records would say nothing new."""
    models: dict[str, list[dict[str, Any]]] = {}
    for actor in actors:
        models.setdefault(actor["model"], []).append(actor)
    held = {}
    for model, slots in models.items():
        if not any(a["alive"] for a in slots):
            problems = "; ".join(sorted({a["problem"] for a in slots if a["problem"]}))
            why = f" ({problems})" if problems else ""
            held[model] = f"waiting: no live Ray actor of model {model}{why}"
    return held


def waiting_reason(reason: str, waiting: str | None) -> str:
    """A queued job's reason, with why it waits first, if it waits for its model's actors."""
    if not waiting:
        return reason
    return f"{waiting}; {reason}" if reason else waiting


def record_dict(record: Any) -> dict[str, Any]:
    """A dataclass record (a job, an outbox record) as JSON-able values."""
    return {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(record).items()}


def outbox(src: Sources, state: str | None, limit: int = 200) -> list[dict[str, Any]]:
    return [record_dict(r) for r in src.outbox.list(state, limit)]


def dumps(value: Any) -> bytes:
    return json.dumps(value, indent=1, default=str).encode()

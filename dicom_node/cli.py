"""The ``dicom-node`` command line: thin commands over the same core functions the node uses.

Exit codes: 0 success, 1 the operation failed (a peer refused, say), 2 bad usage or bad config
(one line on stderr naming the file, the key, the value and what was expected).
"""

import argparse
import gc
import json
import logging
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dicom_node import __version__
from dicom_node.audit import append_event, job_requeued, result_retried, study_history
from dicom_node.config import DEFAULT_CONFIG, ENV_CONFIG, Settings, load_settings, parse_assignment
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.export.outbox import DeliveryState
from dicom_node.jobs.queue import Job, JobError, JobQueue, JobState
from dicom_node.logs import setup_logging

if TYPE_CHECKING:
    from dicom_node.export import OutboxRecord
    from dicom_node.pipeline import Step

logger = logging.getLogger(__name__)

def _record_id(text: str) -> int:
    """An argparse type: a job or outbox record id, else a usage error (exit 2), not a traceback."""
    from dicom_node.store.db import parse_record_id

    try:
        return parse_record_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, default=None,
        help=f"settings file (default ${ENV_CONFIG} or {DEFAULT_CONFIG})",
    )
    common.add_argument(
        "--set", dest="assignments", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting (repeatable); wins over the file and DICOM_NODE_* variables",
    )
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the node until SIGINT/SIGTERM")
    serve.add_argument("--port", type=int, help="DICOM port (node.port); 0 picks a free one")
    serve.add_argument("--ae-title", help="called AE title (node.ae_title)")
    serve.add_argument("--data-dir", help="data folder (node.data_dir)")

    jobs = commands.add_parser("jobs", help="list, show and requeue jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    listing = jobs_commands.add_parser("list", parents=[common], help="list jobs, newest first")
    listing.add_argument("--state", choices=[s.value for s in JobState], help="only jobs in this state")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    show = jobs_commands.add_parser("show", parents=[common], help="one job in full")
    show.add_argument("id", type=_record_id)
    requeue = jobs_commands.add_parser("requeue", parents=[common],
                                       help="run a failed, dead or done job again")
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=_record_id, nargs="?", help="the job to requeue")
    which.add_argument("--failed", action="store_true", help="every failed and dead job")

    outbox = commands.add_parser("outbox", help="results waiting for, or given up by, their destinations")
    outbox_commands = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    pending = outbox_commands.add_parser("list", parents=[common], help="outbox records, newest first")
    pending.add_argument("--state", choices=[s.value for s in DeliveryState],
                         help="only this state")
    pending.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    retry = outbox_commands.add_parser("retry", parents=[common],
                                       help="send dead, unconfirmed (or delivered) records again")
    chosen = retry.add_mutually_exclusive_group(required=True)
    chosen.add_argument("id", type=_record_id, nargs="?", help="the record to send again")
    chosen.add_argument("--dead", action="store_true", help="every dead record")
    chosen.add_argument("--unconfirmed", action="store_true",
                        help="every unconfirmed record (sent, never answered: the destination may hold it)")

    explain = commands.add_parser("explain", parents=[common],
                                  help="run the pipelines on files, without a network, writing the results")
    explain.add_argument("inputs", nargs="+", type=Path, metavar="FILE_OR_DIR", help="DICOM files or folders")
    explain.add_argument("--out", type=Path, required=True, help="folder for the result files")
    explain.add_argument("--pipeline",
                         help="run this pipeline on every series (default: route as serve does)")

    audit = commands.add_parser("audit", parents=[common], help="the audit trail of a study")
    audit.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    audit.add_argument("--json", action="store_true", help="print the events as JSON lines")

    models = commands.add_parser("models", help="the model repository")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    models_commands.add_parser("list", parents=[common], help="the models and their manifests")
    models_commands.add_parser("verify", parents=[common],
                               help="load every model, check weights and pipelines (as serve does) and the "
                                    "sanity check of its maps (cached per weights sha256)")
    calibrate = models_commands.add_parser(
        "calibrate", parents=[common],
        help="build a model's input-distribution reference from a folder of DICOM")
    calibrate.add_argument("name", help="the model")
    calibrate.add_argument("folder", type=Path, help="DICOM images the model is validated on")
    calibrate.add_argument("--update", action="store_true", help="write the [gate] table into model.toml")
    calibrate.add_argument("--seed", type=int, default=0, help="the held-out split's seed (default 0)")

    send = commands.add_parser("send", parents=[common],
                               help="send DICOM files to a peer as they are (compressed ones too)")
    send.add_argument("inputs", nargs="+", type=Path, metavar="FILE_OR_DIR", help="DICOM files or folders")
    send.add_argument("--to", required=True, metavar="AET@HOST:PORT|DESTINATION",
                      help="the peer, or the name of a [[destinations]] entry")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the peer (default 30)")

    purge = commands.add_parser("purge", parents=[common],
                                help="delete inputs and results the retention policy lets go")
    purge.add_argument("--dry-run", action="store_true", help="only list what would go, and why")

    echo = commands.add_parser("echo", parents=[common], help="C-ECHO a DICOM peer")
    echo.add_argument("peer", metavar="AET@HOST:PORT|DESTINATION",
                      help="the peer to verify, or a [[destinations]] entry (with its TLS settings)")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = dict(parse_assignment(a) for a in args.assignments)
    for flag, key in (("port", "node.port"), ("ae_title", "node.ae_title"),
                      ("data_dir", "node.data_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return load_settings(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None, *, steps: "Sequence[tuple[str, Step]] | None" = None) -> int:
    """Entry point of the ``dicom-node`` console script; ``steps`` replaces the pipeline's steps
    (for programs that embed the node with steps of their own)."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        setup_logging(settings.logging.level)
        if args.command == "serve":
            return serve(settings, steps)
        if args.command == "jobs":
            return jobs_command(settings, args, sys.stdout)
        if args.command == "models":
            if args.models_command == "calibrate":
                return calibrate_command(settings, args, sys.stdout)
            return models_command(settings, args.models_command, sys.stdout)
        if args.command == "outbox":
            return outbox_command(settings, args, sys.stdout)
        if args.command == "audit":
            return audit_command(settings, args.study, args.json, sys.stdout)
        if args.command == "explain":
            from dicom_node.offline import explain_files

            return explain_files(settings, args.inputs, args.out, args.pipeline, sys.stdout)
        if args.command == "purge":
            from dicom_node.retention.command import purge_command

            return purge_command(settings, args.dry_run, sys.stdout)
        if args.command == "send":
            from dicom_node.export.push import send_files

            return send_files(settings, args.inputs, args.to, args.timeout, sys.stdout)
        return echo(settings, args.peer, args.timeout, sys.stdout)
    except ConfigError as exc:
        print(f"dicom-node: error: {exc}", file=sys.stderr)
        return 2
    except DicomNodeError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # a full disk or a locked database: one line, not a traceback
        print(f"dicom-node: database error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dicom-node: {exc.filename or 'I/O'}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def serve(settings: Settings, steps: "Sequence[tuple[str, Step]] | None" = None) -> int:
    """Run the node until SIGINT or SIGTERM, then stop without leaving anything half-written."""
    from dicom_node.node import Node

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    node = Node(settings, steps)
    node.start()
    logger.info("dicom-node %s ready (config %s, data_dir %s)", __version__, settings.source,
                settings.node.data_dir)
    try:
        stop.wait()
        logger.info("stopping")
    finally:
        node.stop()
    logger.info("stopped")
    # Everything is closed; what is left is the interpreter's teardown, whose last garbage
    # collections walk every object torch and friends created (about 1 s on 2 busy cores).
    # Frozen objects are skipped: the process exits in a third of that, within the grace + 2 s.
    gc.freeze()
    return 0


def _open_queue(settings: Settings, read_only: bool) -> JobQueue | None:
    """The job queue of ``data_dir``, or None if it has no database yet. ``read_only`` for the
    commands that only look: they never write, so they work on a full disk."""
    from dicom_node.jobs.sqlite import SQLiteJobBackend
    from dicom_node.store.db import DATABASE_NAME

    path = settings.node.data_dir / DATABASE_NAME
    return JobQueue(SQLiteJobBackend(path, read_only=read_only)) if path.exists() else None


def _audit_operator(settings: Settings, event: str, fields: dict[str, Any]) -> None:
    """Audit an operator action that has been done; if the trail cannot take it (a full disk),
    say so in one line that does not read as if the action had failed."""
    try:
        append_event(settings.node.data_dir / "audit", event, **fields)
    except OSError as exc:
        raise DicomNodeError(f"done, but its audit event {event} was not written: "
                             f"{exc.strerror or exc}") from None


def jobs_command(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    """``dicom-node jobs list|show|requeue``: read and re-drive the job table of ``data_dir``."""
    queue = _open_queue(settings, read_only=args.jobs_command in ("list", "show"))
    if queue is None:
        print(f"no jobs: {settings.node.data_dir} has no database yet", file=out)
        return 0 if args.jobs_command == "list" else 1
    try:
        if args.jobs_command == "list":
            state = JobState(args.state) if args.state else None
            listed = queue.list(state, args.limit)
            print(format_jobs(listed, _deliveries(settings, [j.id for j in listed]),
                              queue.current(listed)), file=out)
            return 0
        if args.jobs_command == "show":
            job = queue.get(args.id)
            if job is None:
                raise JobError(f"job {args.id} does not exist")
            print(format_job(job, _deliveries(settings, [job.id]).get(job.id, [])), file=out)
            return 0
        requeued = queue.requeue_failed() if args.failed else [queue.requeue(args.id)]
        logger.info("operator requeued job(s) %s", [j.id for j in requeued])
        for job in requeued:
            _audit_operator(settings, *job_requeued(job, "cli"))
        print(f"requeued {len(requeued)} job(s): {' '.join(str(j.id) for j in requeued)}", file=out)
        return 0
    finally:
        queue.backend.close()


def _deliveries(settings: Settings, job_ids: Sequence[int]) -> "dict[int, list[OutboxRecord]]":
    """The outbox records of each job (read-only); none while the outbox was never opened."""
    from dicom_node.export import Outbox
    from dicom_node.store.db import DATABASE_NAME, SchemaError

    try:
        outbox = Outbox(settings.node.data_dir / DATABASE_NAME, read_only=True)
    except SchemaError:  # a node that never ran its exporter: nothing was queued
        return {}
    try:
        return outbox.for_jobs(job_ids)
    finally:
        outbox.close()


def outbox_command(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    """``dicom-node outbox list|retry``: read and re-drive the outbox of ``data_dir``."""
    from dicom_node.export import DeliveryState, Outbox
    from dicom_node.store.db import DATABASE_NAME

    path = settings.node.data_dir / DATABASE_NAME
    if not path.exists():
        print(f"no outbox: {settings.node.data_dir} has no database yet", file=out)
        return 0 if args.outbox_command == "list" else 1
    outbox = Outbox(path, read_only=args.outbox_command == "list")
    try:
        if args.outbox_command == "list":
            records = outbox.list(args.state, args.limit)
            counts = ", ".join(f"{n} {state}" for state, n in sorted(outbox.counts().items())) or "empty"
            print(f"outbox: {counts}\n" + format_outbox(records, time.time()), file=out)
            return 0
        given_up = (DeliveryState.DEAD if args.dead
                    else DeliveryState.UNCONFIRMED if args.unconfirmed else None)
        ids = [r.id for r in outbox.list(given_up, 100_000)] if given_up else [args.id]
        for record_id in ids:
            _audit_operator(settings, *result_retried(outbox.retry(record_id), "cli"))
        logger.info("operator asked to send outbox record(s) %s again", ids)
        print(f"{len(ids)} record(s) pending again: {' '.join(map(str, ids))}", file=out)
        return 0
    finally:
        outbox.close()


def audit_command(settings: Settings, study: str, as_json: bool, out: TextIO) -> int:
    """``dicom-node audit --study UID``: every event of one study, oldest first."""
    events = study_history(settings.node.data_dir / "audit", study)
    if not events:
        print(f"no audit events for study {study}", file=out)
        return 1
    for event in events:
        if as_json:
            print(json.dumps(event), file=out)
            continue
        shown = {k: v for k, v in event.items() if k not in ("time", "event", "study_instance_uid")}
        details = "  ".join(f"{k}={v}" for k, v in shown.items())
        print(f"{event['time']}  {event['event']:<22} {details}", file=out)
    return 0


def models_command(settings: Settings, action: str, out: TextIO) -> int:
    """``dicom-node models list|verify``."""
    from dicom_node.inference import ModelRegistry
    from dicom_node.node import check_models

    registry = ModelRegistry(settings.models.dir)
    if action == "verify":
        from dicom_node.explain.sanity import verify_models

        check_models(settings, registry)
        for line in verify_models(registry):
            print(line, file=out)
        print(f"ok: {len(registry.names())} model(s) in {settings.models.dir}, "
              f"{len(settings.pipelines)} pipeline(s) checked", file=out)
        return 0
    if not registry.names():
        print(f"no models in {settings.models.dir}", file=out)
    for name in registry.names():
        m = registry.manifest(name)
        grid = ("volume " + "x".join(map(str, m.input.volume)) if m.input.volume
                else f"{m.input.size}px x{m.input.channels}")
        print(f"{m.name} {m.version}  {m.architecture}  input {grid} "
              f"({m.input.normalization})  sha256 {m.sha256[:12]}\n"
              f"  labels: {', '.join(f'{label.name}>={label.threshold:g}' for label in m.labels)}\n"
              f"  for: {', '.join(m.modalities) or 'any modality'}; {m.intended_use}", file=out)
    return 0


def calibrate_command(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    """``dicom-node models calibrate NAME FOLDER``: 0 when the reference was written."""
    from dicom_node.inference.calibrate import calibrate_model

    try:
        report, lines = calibrate_model(settings.models.dir, args.name, args.folder, args.update, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report + lines, end="", file=out)
    return 0


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _due(not_before: float, now: float) -> str:
    """When a pending record goes next: absolute and relative ("2026-01-02 10:00:05 (in 3m 05s)")."""
    wait = round(not_before - now)
    if wait <= 0:
        return f"{_when(not_before)} (now)"
    minutes, seconds = divmod(wait, 60)
    hours, minutes = divmod(minutes, 60)
    relative = (f"{hours}h {minutes:02d}m" if hours
                else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s")
    return f"{_when(not_before)} (in {relative})"


def format_outbox(records: "Sequence[OutboxRecord]", now: float) -> str:
    """One line per outbox record, for a terminal; NEXT TRY is "-" unless the record is pending."""
    lines = [f"{'ID':>5}  {'STATE':<11} {'TRY':>3} {'SENT':>4}  {'DESTINATION':<12} {'UPDATED':<19}  "
             f"{'NEXT TRY':<30}  SOP INSTANCE / REASON"]
    for r in records:
        due = _due(r.not_before, now) if r.state == "pending" else "-"
        lines.append(f"{r.id:>5}  {r.state:<11} {r.attempts:>3} {r.sends:>4}  {r.destination:<12} "
                     f"{_when(r.updated_at):<19}  {due:<30}  {r.sop_instance_uid}")
        if r.reason:
            lines.append(f"{'':>95}{r.reason}")
    return "\n".join(lines)


def format_jobs(jobs: Sequence[Job], deliveries: "Mapping[int, Sequence[OutboxRecord]]",
                current: Collection[int] = ()) -> str:
    """One line per job, for a terminal. OUTCOME says whether the PACS was told anything; CURRENT
    marks the newest version of each series and pipeline (``current``: their ids), whose results
    supersede the earlier versions'."""
    from dicom_node.export.outcome import describe_job

    lines = [f"{'ID':>5}  {'STATE':<10} {'TRY':>3}  {'PIPELINE':<12} {'V':>2} {'CURRENT':<7}  "
             f"{'UPDATED':<19}  {'OUTCOME':<36}  STUDY SERIES / REASON"]
    for j in jobs:
        outcome = describe_job(j.state, deliveries.get(j.id, []), j.results)
        # a series is its study and its Series Instance UID: two studies may share the latter
        mark = "yes" if j.id in current else "-"
        lines.append(f"{j.id:>5}  {j.state:<10} {j.attempts:>3}  {j.pipeline or '-':<12} {j.version:>2} "
                     f"{mark:<7}  {_when(j.updated_at):<19}  {outcome:<36}  "
                     f"{j.study_instance_uid} {j.series_instance_uid}")
        if j.reason:
            lines.append(f"{'':>107}{j.reason}")
    return "\n".join(lines) if jobs else "no jobs"


def format_job(job: Job, deliveries: "Sequence[OutboxRecord]") -> str:
    """Every field of one job, one per line, then what its outbox records became."""
    from dicom_node.export.outcome import describe_job

    rows = [("id", job.id), ("state", job.state),
            ("outcome", describe_job(job.state, deliveries, job.results)),
            ("reason", job.reason or "-"),
            ("pipeline", job.pipeline or "-"), ("model", f"{job.model} {job.model_version}".strip() or "-"),
            ("version", job.version), ("attempts", job.attempts), ("study", job.study_instance_uid),
            ("series", job.series_instance_uid), ("instances", len(job.instance_uids)),
            ("created", _when(job.created_at)), ("updated", _when(job.updated_at)),
            ("finished", _when(job.finished_at)),
            ("not before", _when(job.not_before)), ("lease owner", job.lease_owner or "-")]
    rows += [(f"time {step}", f"{seconds:.3f} s") for step, seconds in job.timings.items()]
    rows += _gate_rows(job.results)
    for p in job.results.get("predictions", []):
        found = ", ".join(p["positives"]) or "nothing above threshold"
        scores = " ".join(f"{k}={v:.3f}" for k, v in p["probabilities"].items())
        rows.append(("result", f"{p['sop_instance_uid']} frame {p['frame']}: {found} ({scores})"))
    for e in job.results.get("explanations", []):
        if "sop_instance_uid" not in e:  # a segmentation model's map of the whole volume
            rows.append(("explained", f"{e['label']} by {e['method']} at {e['layer']} (volume)"))
            continue
        q = e["quality"]
        figures = (f"deletion AUC {q.get('deletion_auc', float('nan')):.3f} "
                   f"(random {q.get('deletion_auc_random', float('nan')):.3f})")
        if "stability" in q:
            figures += f", stability {q['stability']:.3f}"
        rows.append(("explained", f"{e['label']} by {e['method']} on {e['sop_instance_uid']}: "
                                  f"{e.get('verdict', 'not shown to be faithful')}; {figures}"))
    rows += _prototype_rows(job.results)
    rows += [("not made", f"{f['output']} ({f['error']})") for f in job.results.get("outputs_failed", [])]
    rows += [("instance", uid) for uid in job.instance_uids]
    rows += [("sent", f"{r.sop_instance_uid} to {r.destination}: {r.state} (outbox record {r.id})")
             for r in deliveries]
    return "\n".join(f"{name:<12} {value}" for name, value in rows)


def _prototype_rows(results: dict[str, Any]) -> list[tuple[str, object]]:
    """A prototype network's explanations in ``jobs show``: per finding, its prototypes in order."""
    return [("prototype", f"{x['label']} on {x['sop_instance_uid']} frame {x['frame']}: prototype "
                          f"{p['prototype']} similarity {p['similarity']:.3f} (training phantom seed "
                          f"{p['seed']}, patch {','.join(map(str, p['box']))} at {p['render_size']} px; "
                          f"{'shows' if p['shows_finding'] else 'does not show'} the finding)")
            for x in results.get("prototypes", []) for p in x["prototypes"]]


def _gate_rows(results: dict[str, Any]) -> list[tuple[str, object]]:
    """The input-distribution gate's lines of ``jobs show``: the outcome, each frame's score."""
    gate = results.get("gate")
    if not gate:
        return []
    rows: list[tuple[str, object]] = []
    if results.get("outcome"):
        rows.append(("gate", f"{results['outcome']}: {results.get('outcome_reason', '')}"))
    rows += [("gate", f"{f['sop_instance_uid']} frame {f['frame']}: "
                      f"out-of-distribution score {f['score']:.3f} "
                      f"(threshold {gate['threshold']:.3f}){' OUTSIDE' if f['outside'] else ''}")
             for f in gate["frames"]]
    return rows


def echo(settings: Settings, peer: str, timeout: float, out: TextIO) -> int:
    """C-ECHO ``AET@HOST:PORT`` or a destination (over TLS if it has ``tls = true``) as the node's
    AE title; 0 if the peer answered success."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicom_node.export.push import peer_tls, resolve_peer

    target = resolve_peer(settings, peer)
    tls_args = peer_tls(settings, target)
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "no association (refused, aborted or timed out)"
        if tls_args is not None and tls_args[0].failure:
            reason = f"TLS handshake failed: {tls_args[0].failure}"
        print(f"C-ECHO {peer}: {reason}", file=out)
        return 1
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    print(f"C-ECHO {peer}: " + ("success" if code == 0 else f"failed (status {code})"), file=out)
    return 0 if code == 0 else 1

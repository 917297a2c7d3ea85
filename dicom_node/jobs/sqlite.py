"""The job backend in the node's SQLite database (component ``jobs``), the default."""

import json
import logging
import sqlite3
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from dicom_node.audit import append_event
from dicom_node.jobs.queue import Job, JobSpec, JobState, job_key
from dicom_node.store.db import Migration, connect, database_file, migrate, transaction
from dicom_node.store.index import studies_of

logger = logging.getLogger(__name__)


def _key_series_by_study(conn: sqlite3.Connection) -> None:
    """Schema 2: a series is its study and its Series Instance UID together; idempotency keys are
    recomputed with the study, so instances already processed and sent again still change nothing."""
    conn.execute("DROP INDEX jobs_by_series")
    conn.execute("CREATE INDEX jobs_by_series ON jobs (study_instance_uid, series_instance_uid, pipeline)")
    rows = conn.execute("SELECT id, study_instance_uid, series_instance_uid, instance_uids, pipeline, model, "
                        "model_version FROM jobs").fetchall()
    for job_id, study, series, uids, pipeline, model, version in rows:
        key = job_key(study, series, json.loads(uids), pipeline, model, version)
        conn.execute("UPDATE jobs SET key = ? WHERE id = ?", (key, job_id))


#: Output UIDs a flagged job's reason lists; the audit event lists them all.
_REASON_OUTPUTS = 10


def _flag_mixed_results(conn: sqlite3.Connection) -> None:
    """Schema 3: flag the finished jobs of the first version that mixed studies.

    That version keyed a series by its Series Instance UID alone, so one job could take the
    instances of several studies (several patients) and file one's findings in the other's
    study. Schema 2 makes new jobs per study, but what such a job sent stays in the PACS: each
    one found (its instances now in more than one study) gets a reason that says which outputs
    to remove, an ERROR and the audit event ``mixed_results_delivered``, once, here.
    """
    has_store = "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'instances'"
    if conn.execute(has_store).fetchone() is None:
        return  # no store in this database: nothing stored, nothing mixed
    rows = conn.execute("SELECT id, study_instance_uid, series_instance_uid, instance_uids, reason, results "
                        "FROM jobs WHERE state IN (?, ?, ?)",
                        (str(JobState.DONE), str(JobState.FAILED), str(JobState.DEAD))).fetchall()
    for job_id, study, series, uids, reason, results in rows:
        studies = studies_of(conn, json.loads(uids))
        if len(studies) < 2:
            continue
        outputs = [str(out["sop_instance_uid"]) for out in json.loads(results).get("outputs", [])]
        flag = mixed_results_reason(studies, outputs)
        flagged = f"{flag}; {reason}" if reason else flag
        conn.execute("UPDATE jobs SET reason = ? WHERE id = ?", (flagged, job_id))
        logger.error("job %d (series %s of study %s) mixed the instances of studies %s before the upgrade; "
                     "its %d output(s) must be removed from the PACS: %s", job_id, series, study,
                     ", ".join(studies), len(outputs), ", ".join(outputs) or "see its outbox records")
        _audit_mixed_results(conn, job=job_id, study_instance_uid=study, series_instance_uid=series,
                             study_instance_uids=studies, outputs=outputs)


def mixed_results_reason(studies: Sequence[str], outputs: Sequence[str]) -> str:
    """The reason a job flagged by :func:`_flag_mixed_results` shows on the dashboard and CLI."""
    listed = ", ".join(outputs[:_REASON_OUTPUTS])
    if len(outputs) > _REASON_OUTPUTS:
        listed += f" and {len(outputs) - _REASON_OUTPUTS} more (audit event mixed_results_delivered)"
    what = f"outputs {listed}" if outputs else "this job's outputs (its outbox records)"
    return f"results mixed {len(studies)} studies before the upgrade: remove {what} from the PACS"


def _audit_mixed_results(conn: sqlite3.Connection, **fields: object) -> None:
    """The audit event, in the audit folder beside the database (the node's ``data_dir/audit``);
    the migration runs before any trail is open. Not written (full disk): the job's reason and the
    ERROR still say it."""
    path = database_file(conn)
    if path is None:
        return
    try:
        append_event(path.parent / "audit", "mixed_results_delivered", **fields)
    except OSError as exc:
        logger.error("audit event mixed_results_delivered of job %s not written: %s", fields["job"], exc)


_MIGRATIONS: tuple[Migration, ...] = (
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL UNIQUE,
        study_instance_uid TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL,
        instance_uids TEXT NOT NULL,
        pipeline TEXT NOT NULL,
        model TEXT NOT NULL,
        model_version TEXT NOT NULL,
        version INTEGER NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        not_before REAL NOT NULL,
        lease_owner TEXT NOT NULL,
        lease_expires_at REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL NOT NULL,
        timings TEXT NOT NULL,
        results TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX jobs_by_state ON jobs (state, not_before);
    CREATE INDEX jobs_by_lease ON jobs (state, lease_expires_at);
    CREATE INDEX jobs_by_series ON jobs (series_instance_uid, pipeline);
    CREATE TABLE scheduler_state (
        name TEXT PRIMARY KEY,
        value REAL NOT NULL
    );
    """,
    _key_series_by_study,
    _flag_mixed_results,
    # schema 4: attempts handed back uncounted in a row (QueuePolicy.max_handbacks)
    "ALTER TABLE jobs ADD COLUMN handbacks INTEGER NOT NULL DEFAULT 0",
    # schema 5: a claim restricted to some models (Ray) walks only their queued jobs, by id
    "CREATE INDEX jobs_by_model ON jobs (state, model, id)",
)
_COLUMNS = (
    "id, key, study_instance_uid, series_instance_uid, instance_uids, pipeline, model, "
    "model_version, version, state, reason, attempts, not_before, lease_owner, lease_expires_at, "
    "created_at, updated_at, finished_at, timings, results, handbacks"
)


def _job(row: tuple) -> Job:
    values = list(row)
    values[4] = tuple(json.loads(values[4]))
    values[9] = JobState(values[9])
    values[18] = json.loads(values[18])
    values[19] = json.loads(values[19])
    return Job(*values)


class SQLiteJobBackend:
    """Job records in ``jobs``; every commit is durable (``synchronous=FULL``)."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        # read_only: for commands that only look (jobs list/show); they must work on a full disk
        self.conn = connect(path, synchronous="FULL", read_only=read_only)
        migrate(self.conn, "jobs", _MIGRATIONS)
        # a reader's transactions take no write lock (it could not get one)
        self._begin = "BEGIN" if read_only else "BEGIN IMMEDIATE"
        self._lock = threading.RLock()
        self._depth = 0

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            outer = self._depth == 0
            self._depth += 1
            try:
                if outer:
                    with transaction(self.conn, self._begin):
                        yield
                else:
                    yield
            finally:
                self._depth -= 1

    def insert(self, spec: JobSpec, version: int, now: float) -> Job | None:
        finished = now if spec.state == JobState.NOT_ROUTED else 0.0
        try:
            cursor = self.conn.execute(
                f"INSERT INTO jobs ({_COLUMNS}) "
                "VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, '', 0, ?, ?, ?, '{}', '{}', 0)",
                (spec.key, spec.study_instance_uid, spec.series_instance_uid,
                 json.dumps(list(spec.instance_uids)), spec.pipeline, spec.model, spec.model_version,
                 version, str(spec.state), spec.reason, now, now, finished),
            )
        except sqlite3.IntegrityError:
            return None  # the same idempotency key: this work is recorded already
        assert cursor.lastrowid is not None
        return self.get(cursor.lastrowid)

    def versions(self, study_instance_uid: str, series_instance_uid: str, pipeline: str) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM jobs WHERE study_instance_uid = ? AND series_instance_uid = ? "
            "AND pipeline = ?",
            (study_instance_uid, series_instance_uid, pipeline),
        ).fetchone()
        return int(row[0])

    def series_jobs(self, study_instance_uid: str, series_instance_uid: str,
                    pipeline: str | None) -> list[Job]:
        """The jobs of one series and pipeline by version; ``pipeline`` None: of every pipeline."""
        query = f"SELECT {_COLUMNS} FROM jobs WHERE study_instance_uid = ? AND series_instance_uid = ?"
        args: tuple[str, ...] = (study_instance_uid, series_instance_uid)
        if pipeline is not None:
            query, args = query + " AND pipeline = ?", (*args, pipeline)
        rows = self.conn.execute(query + " ORDER BY version, id", args).fetchall()
        return [_job(row) for row in rows]

    def get(self, job_id: int) -> Job | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def save(self, job: Job) -> None:
        self.conn.execute(
            "UPDATE jobs SET state = ?, reason = ?, attempts = ?, not_before = ?, lease_owner = ?, "
            "lease_expires_at = ?, updated_at = ?, finished_at = ?, timings = ?, results = ?, handbacks = ? "
            "WHERE id = ?",
            (str(job.state), job.reason, job.attempts, job.not_before, job.lease_owner,
             job.lease_expires_at, job.updated_at, job.finished_at, json.dumps(job.timings),
             json.dumps(job.results), job.handbacks, job.id),
        )

    def select(self, states: Sequence[JobState], limit: int | None = None) -> list[Job]:
        marks = ", ".join("?" * len(states))
        query = f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY id DESC"
        args: list[object] = [str(s) for s in states]
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        return [_job(row) for row in self.conn.execute(query, args).fetchall()]

    def next_due(self, now: float, models: Collection[str] | None = None) -> Job | None:
        if models is None:
            row = self.conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = 'queued' AND not_before <= ? ORDER BY id LIMIT 1",
                (now,)).fetchone()
            return _job(row) if row else None
        # one model at a time on jobs_by_model: the other models' queued jobs (thousands, when
        # a model's actors are down) are never read
        rows = [self.conn.execute(
            f"SELECT {_COLUMNS} FROM jobs INDEXED BY jobs_by_model WHERE state = 'queued' AND model = ? "
            "AND not_before <= ? ORDER BY id LIMIT 1", (model, now)).fetchone() for model in sorted(models)]
        due = [_job(row) for row in rows if row]
        return min(due, key=lambda j: j.id) if due else None

    def expired(self, now: float) -> list[Job]:
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = 'running' AND lease_expires_at < ?", (now,),
        ).fetchall()
        return [_job(row) for row in rows]

    def watermark(self) -> float:
        row = self.conn.execute("SELECT value FROM scheduler_state WHERE name = 'watermark'").fetchone()
        return float(row[0]) if row else 0.0

    def set_watermark(self, value: float) -> None:
        self.conn.execute("INSERT OR REPLACE INTO scheduler_state VALUES ('watermark', ?)", (value,))

"""``dicom-node`` with one extra pipeline step that records every run in a file.

Run as ``python -m tests.fake_node serve --config ...`` from the repository root. The step
appends ``start <job id>`` to ``$FAKE_STEP_RECORD``, works for ``$FAKE_STEP_SECONDS`` (default 0),
then appends ``done <job id>``; each line is flushed to disk before the step goes on.
"""

import os
import time
from pathlib import Path

from dicom_node.cli import main
from dicom_node.pipeline import PipelineContext, collect


def _append(path: Path, line: str) -> None:
    with path.open("a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def record_run(ctx: PipelineContext) -> None:
    record = Path(os.environ["FAKE_STEP_RECORD"])
    _append(record, f"start {ctx.job.id} {len(ctx.instances)}")
    time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0")))  # stands for long model work
    _append(record, f"done {ctx.job.id} {len(ctx.instances)}")


if __name__ == "__main__":
    raise SystemExit(main(steps=[("collect", collect), ("fake", record_run)]))

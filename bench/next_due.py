"""How long a claim restricted to some models takes when another model's jobs pile up.

With Ray, the workers claim only the jobs of models with a free actor (``JobQueue.claim(worker,
models)``); a model whose actors are down leaves its jobs queued. This times
``SQLiteJobBackend.next_due(now, models)`` for the live model with ``--queued`` due jobs of a
dead model in the table.

    PYTHONPATH=. python bench/next_due.py --queued 100000
"""

import argparse
import tempfile
import time
from pathlib import Path

from dicom_node.jobs.queue import JobSpec
from dicom_node.jobs.sqlite import SQLiteJobBackend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=100_000, help="due queued jobs of the dead model")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        backend = SQLiteJobBackend(Path(folder) / "jobs.sqlite")
        with backend.transaction():
            for i in range(args.queued):
                backend.insert(JobSpec("1.2", f"1.2.{i}", (f"1.2.{i}.1",), "p", "dead", "1"), 1, 0.0)
            for i in range(10):
                backend.insert(JobSpec("1.3", f"1.3.{i}", (f"1.3.{i}.1",), "p", "live", "1"), 1, 0.0)
        seconds = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            with backend.transaction():
                job = backend.next_due(1.0, {"live"})
            seconds.append(time.perf_counter() - started)
            assert job is not None and job.model == "live"
        seconds.sort()
        median, p95 = seconds[len(seconds) // 2] * 1e3, seconds[int(len(seconds) * 0.95)] * 1e3
        print(f"{args.queued} queued jobs of a dead model: next_due for the live one "
              f"median {median:.3f} ms, p95 {p95:.3f} ms ({args.rounds} rounds)")
        backend.close()


if __name__ == "__main__":
    main()

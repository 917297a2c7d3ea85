"""The Ray executor: two single-threaded actors against one, Ray's per-job overhead against the
local executor, and what a cold cluster costs.

20 one-instance phantom CR studies (512 px; Grad-CAM and LIME-1000, the pipeline's defaults, on
the positive labels of the demo model) go through ``pipeline.compute_steps``:

1. locally, in this process, with one torch thread (the anchor: the local executor's compute);
2. through a :class:`RayExecutor` with one actor, then with two (one CPU and one torch thread
   each), fed by as many threads as actors, as the node's workers do. As in the node, the
   executor's Ray driver is a child process: a call goes node -> driver process -> actor.

The cluster is real: a head without CPUs and two worker nodes of one CPU each, on loopback
(``tests/ray/cluster.py``). Each executor starts cold (no actor): the time until its actors are
ready is the cold start, paid once; the jobs are timed after it, the first one on its own.

Usage: ``.venv/bin/python bench/ray.py [--studies 20] [--lime-samples 1000]``
"""

import sys
from pathlib import Path

# this file is named ray.py: its folder on sys.path would hide the ray package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback (one machine)

import pydicom  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node import pipeline  # noqa: E402
from dicom_node.config import InferenceSettings, ModelsSettings, Pipeline, Settings, WorkersSettings  # noqa: E402
from dicom_node.inference import InferenceRunner, ModelRegistry  # noqa: E402
from dicom_node.jobs.queue import Job, JobState  # noqa: E402
from dicom_node.phantoms import write_study  # noqa: E402
from dicom_node.scaleout import RayExecutor  # noqa: E402
from tests.nodeproc import free_port  # noqa: E402
from tests.ray.cluster import LocalCluster  # noqa: E402


def studies(folder: Path, count: int) -> list[list[pydicom.Dataset]]:
    """``count`` one-instance studies, each with both findings drawn (so both are explained)."""
    findings = {"nodule": True, "effusion": True}
    return [[pydicom.dcmread(p) for p in write_study(folder / str(i), 1, seed=4_000_000 + i, size=512,
                                                     modality="CR", findings=findings)]
            for i in range(count)]


def job_of(i: int, datasets: list[pydicom.Dataset]) -> Job:
    ds = datasets[0]
    return Job(i, f"bench-{i}", str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
               tuple(str(d.SOPInstanceUID) for d in datasets), "chest", "demo-cxr", "", 1, JobState.RUNNING,
               "", 1, 0.0, "bench", 0.0, 0.0, 0.0, 0.0)


def context(settings: Settings, job: Job, datasets: list[pydicom.Dataset],
            runner: InferenceRunner) -> pipeline.PipelineContext:
    return pipeline.PipelineContext(job=job, settings=settings, store=None, runner=runner,  # type: ignore[arg-type]
                                    datasets=datasets)


def local(settings: Settings, series: list[list[pydicom.Dataset]]) -> list[float]:
    """Seconds per job of the compute steps in this process, one torch thread."""
    torch.set_num_threads(1)
    runner = InferenceRunner(ModelRegistry(settings.models.dir), "cpu")
    runner.model("demo-cxr")
    runner.baselines("demo-cxr")
    seconds = []
    for i, datasets in enumerate(series):
        ctx = context(settings, job_of(i, datasets), datasets, runner)
        started = time.perf_counter()
        for _, step in pipeline.compute_steps():
            step(ctx)
        seconds.append(time.perf_counter() - started)
    return seconds


def through_ray(settings: Settings, series: list[list[pydicom.Dataset]]) -> dict[str, float]:
    """Cold start, the first job alone, then the rest with one feeding thread per actor."""
    registry = ModelRegistry(settings.models.dir)
    runner = InferenceRunner(registry, "cpu")  # reads manifests only, as the node's does with Ray
    executor = RayExecutor(settings, registry, ["demo-cxr"])
    started = time.perf_counter()
    executor.start()
    while executor.not_ready() is not None:
        time.sleep(0.05)
    cold = time.perf_counter() - started
    actors = executor.statuses()
    contexts = [context(settings, job_of(i, d), d, runner) for i, d in enumerate(series)]

    steps = [name for name, _ in pipeline.compute_steps()]

    def one(ctx: pipeline.PipelineContext) -> tuple[float, float, float]:
        """The call's seconds, those of them not spent in the actor's steps (the overhead), and
        those not spent in the driver process (the link's part of it; 0 where there is none)."""
        began = time.perf_counter()
        executor.compute(ctx)
        seconds = time.perf_counter() - began
        driver = ctx.timings.get("ray_driver", seconds)
        return seconds, seconds - sum(ctx.timings.get(name, 0.0) for name in steps), seconds - driver

    first, _, _ = one(contexts[0])
    began = time.perf_counter()
    with ThreadPoolExecutor(len(actors)) as pool:
        per_job = list(pool.map(one, contexts[1:]))
    wall = time.perf_counter() - began
    executor.stop()
    return {"cold": cold, "ready": max(a["ready_seconds"] for a in actors),
            "load": max(a["load_seconds"] for a in actors), "first": first, "wall": wall,
            "median": statistics.median(s for s, _, _ in per_job), "jobs": len(per_job),
            "overhead": statistics.median(o for _, o, _ in per_job),
            "overhead_max": max(o for _, o, _ in per_job),
            "link": statistics.median(k for _, _, k in per_job)}


def settings_for(address: str, actors: int, lime_samples: int) -> Settings:
    return Settings(models=ModelsSettings(dir=ROOT / "models"), inference=InferenceSettings(threads=1),
                    workers=WorkersSettings(executor="ray", ray_address=address, ray_actors_per_model=actors,
                                            ray_cpus_per_actor=1.0, ray_connect_seconds=0.2),
                    pipelines=(Pipeline(name="chest", model="demo-cxr", explain=("gradcam", "lime"),
                                        lime_samples=lime_samples),))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--lime-samples", type=int, default=1000)
    parser.add_argument("--no-local", action="store_true", help="skip the local anchor (saves minutes)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; load average at start {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        series = studies(Path(tmp), args.studies)
    cluster = LocalCluster(free_port())
    try:
        anchor = [] if args.no_local else local(settings_for("", 1, args.lime_samples), series)
        if anchor:
            print(f"local executor, 1 thread: {sum(anchor):.1f} s for {len(anchor)} jobs, "
                  f"median {statistics.median(anchor):.2f} s/job")
        began = time.perf_counter()
        cluster.start()
        print(f"cluster (head + 2 worker nodes) started in {time.perf_counter() - began:.1f} s")
        runs = {}
        for actors in (1, 2):
            r = through_ray(settings_for(cluster.address, actors, args.lime_samples), series)
            runs[actors] = r
            print(f"ray, {actors} actor(s): cold start {r['cold']:.1f} s (actor ready {r['ready']:.1f} s, "
                  f"model load {r['load']:.2f} s); first job {r['first']:.2f} s; "
                  f"{r['jobs']} jobs in {r['wall']:.1f} s, median {r['median']:.2f} s/job; "
                  f"outside the actor's steps: median {r['overhead'] * 1e3:.0f} ms, "
                  f"max {r['overhead_max'] * 1e3:.0f} ms, of which node <-> driver process: "
                  f"median {r['link'] * 1e3:.1f} ms")
    finally:
        cluster.shutdown()
    local_median = statistics.median(anchor[1:]) if anchor else float("nan")
    one, two = runs[1], runs[2]
    print(f"two actors vs one: {one['wall'] / two['wall']:.2f}x faster (target >= 1.5x)")
    print(f"per-job overhead of Ray (1 actor): {one['overhead'] * 1000:.0f} ms median outside the actor's "
          f"steps; job median {one['median']:.2f} s vs local {local_median:.2f} s (not the same minutes: "
          "on a shared VM only the first figure is robust)")
    print(f"cold start paid once: first job {one['first']:.2f} s vs median {one['median']:.2f} s")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()

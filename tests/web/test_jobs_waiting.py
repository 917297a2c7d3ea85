"""The jobs page says why a queued job waits when its model has no live Ray actor: the workers
claim none of its jobs, so their records alone would show nothing happening."""

from types import SimpleNamespace

from dicom_node.jobs.memory import MemoryJobBackend
from dicom_node.jobs.queue import JobQueue, JobSpec
from dicom_node.web import data


def actor(model: str, slot: int, alive: bool, problem: str = "") -> dict[str, object]:
    return {"model": model, "slot": slot, "alive": alive, "problem": problem}


def test_queued_jobs_of_a_model_without_a_live_actor_say_why_they_wait() -> None:
    queue = JobQueue(MemoryJobBackend())
    for model in ("good", "bad"):
        queue.enqueue(JobSpec("1.2", f"1.2.{len(model)}", ("1.2.3",), "p", model, "1"))
    claimed = queue.claim("w", ["good"])
    assert claimed is not None and claimed.model == "good"
    queue.enqueue(JobSpec("1.2", "1.2.9", ("1.2.9.1",), "p", "good", "1"))
    actors = [actor("good", 0, True), actor("bad", 0, False, "could not start: ModelError: weights differ"),
              actor("bad", 1, False, "could not start: ModelError: weights differ")]
    src = SimpleNamespace(queue=queue, outbox=SimpleNamespace(for_jobs=lambda ids: {}), actors=lambda: actors)
    rows = {(j["model"], j["state"]): j["reason"] for j in data.jobs(src, None)}  # type: ignore[arg-type]
    assert rows[("bad", "queued")] == ("waiting: no live Ray actor of model bad "
                                       "(could not start: ModelError: weights differ)")
    assert rows[("good", "queued")] == "" and rows[("good", "running")] == ""
    local = SimpleNamespace(queue=queue, outbox=SimpleNamespace(for_jobs=lambda ids: {}), actors=list)
    assert all(j["reason"] == "" for j in data.jobs(local, None))  # type: ignore[arg-type]


def test_the_waiting_reason_comes_before_the_jobs_own() -> None:
    assert data.waiting_reason("UnavailableError: lost", "waiting: x") == "waiting: x; UnavailableError: lost"
    assert data.waiting_reason("requeued", None) == "requeued"
    assert data.held_back([actor("m", 0, False), actor("m", 1, True)]) == {}
    assert data.held_back([actor("m", 0, False)]) == {"m": "waiting: no live Ray actor of model m"}

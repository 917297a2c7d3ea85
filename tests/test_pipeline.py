"""The pipeline chain: steps in order, timings recorded, missing inputs fail permanently."""

from pathlib import Path

import pytest

from dicom_node.config import Settings
from dicom_node.errors import PermanentError
from dicom_node.jobs.queue import Job, JobState
from dicom_node.pipeline import PipelineContext, collect, default_steps, run
from dicom_node.store import InstanceStore
from tests.factories import ct_dataset
from tests.store.test_store import put


def job_for(uids: tuple[str, ...]) -> Job:
    return Job(id=1, key="k", study_instance_uid="1.2", series_instance_uid="1.2.3", instance_uids=uids,
               pipeline="p", model="m", model_version="1", version=1, state=JobState.RUNNING,
               reason="", attempts=1, not_before=0, lease_owner="w", lease_expires_at=0, created_at=0,
               updated_at=0, finished_at=0)


def test_steps_run_in_order_and_each_is_timed(store: InstanceStore, settings: Settings) -> None:
    records = [put(store, ct_dataset()) for _ in range(2)]
    order: list[str] = []

    def later(ctx: PipelineContext) -> None:
        order.append(f"later saw {len(ctx.instances)}")

    timings: dict[str, float] = {}
    ctx = run(job_for(tuple(r.sop_instance_uid for r in records)), timings, settings=settings,
              store=store, steps=[("collect", collect), ("later", later)])
    assert order == ["later saw 2"]
    assert [r.sop_instance_uid for r in ctx.instances] == [r.sop_instance_uid for r in records]
    assert list(timings) == ["collect", "later"] and all(t >= 0 for t in timings.values())


def test_a_missing_instance_fails_permanently(store: InstanceStore, settings: Settings) -> None:
    timings: dict[str, float] = {}
    with pytest.raises(PermanentError, match="no longer stored"):
        run(job_for(("1.2.3.999",)), timings, settings=settings, store=store, steps=default_steps())
    assert "collect" in timings  # the failed step's time is kept


def test_a_missing_file_fails_permanently(store: InstanceStore, settings: Settings) -> None:
    record = put(store, ct_dataset())
    Path(store.path_of(record)).unlink()
    with pytest.raises(PermanentError, match="missing from the store"):
        run(job_for((record.sop_instance_uid,)), {}, settings=settings, store=store,
            steps=default_steps())

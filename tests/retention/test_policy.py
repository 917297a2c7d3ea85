"""The retention rules with an injected clock: inputs and results aged past their limits go only
when everything made from them is delivered or given up; everything else stays."""

import json
import os
from pathlib import Path

import pytest

from dicom_node.config import RetentionSettings
from dicom_node.export.outbox import DeliveryState
from dicom_node.jobs.queue import JobState
from dicom_node.retention import PURGED, Kept, Kind
from tests.factories import ct_dataset
from tests.retention.world import DAY, World, settle
from tests.store.test_store import put

D, P, X, U = DeliveryState.DELIVERED, DeliveryState.PENDING, DeliveryState.DEAD, DeliveryState.UNCONFIRMED


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path / "data")
    yield w
    w.close()


def indexed(world: World) -> set[str]:
    return {r.sop_instance_uid for r in world.store.index.instances()}


def test_only_deliverable_and_delivered_data_goes_once_past_its_age(world: World) -> None:
    delivered = world.series(2)
    world.result(world.job(delivered, JobState.DONE), D, D)
    world.job(delivered, JobState.DONE, pipeline="second")
    second = world.series(2)  # every pipeline's jobs count: the second's pending result holds them
    world.result(world.job(second, JobState.DONE), D)
    world.result(world.job(second, JobState.DONE, pipeline="second"), P)
    older = world.series(2)  # every version counts: v1's pending result holds them, v2 is delivered
    world.result(world.job(older, JobState.DONE), P)
    world.result(world.job(older, JobState.DONE, model_version="2"), D)
    given_up = world.series(1)  # dead and unconfirmed deliveries: nothing more is sent by itself
    world.result(world.job(given_up, JobState.DONE), X, U)
    failed_quietly = world.series(1)  # failed before any result: "failed, nothing sent"
    world.job(failed_quietly, JobState.FAILED)
    not_routed = world.series(1)
    world.job(not_routed, JobState.NOT_ROUTED)
    pending = world.series(2)  # one result of two still pending: its inputs stay
    job = world.job(pending, JobState.DONE)
    world.result(job, D)
    waiting_result = world.result(job, D, P)
    running = world.series(1)
    world.job(running, JobState.RUNNING)
    late = world.series(1)  # a new series no job has used yet
    processed = world.series(2)  # delivered, then a late instance came: the next version lists it
    world.result(world.job(processed, JobState.DONE), D)
    late += [put(world.store, ct_dataset(processed[0].study_instance_uid, processed[0].series_instance_uid,
                                         seed=9))]
    queued = world.series(1)
    world.job(queued, JobState.QUEUED)
    unscheduled = world.series(1)  # no job has used it yet
    world.clock.now += 10 * DAY
    young = world.series(1)
    young_result = world.result(world.job(young, JobState.DONE), D)
    everything = indexed(world)
    results_before = set(world.results.root.rglob("*.dcm"))

    world.clock.now += 25 * DAY  # the first lot is 35 days old, the young one 25
    policy = world.retention(RetentionSettings(inputs_days=30, results_days=30))
    plan = policy.plan()
    gone = {r.sop_instance_uid for r in [*delivered, *given_up, *failed_quietly, *not_routed]}
    assert {c.sop_instance_uid for c in plan.by_age if c.kind == Kind.INPUT} == gone
    assert indexed(world) == everything  # planning deletes nothing
    assert "input of a result not yet delivered to dest1" in plan.kept.reasons
    assert plan.kept.reasons["input not yet processed (no job has used it)"] == 3
    assert plan.kept.reasons["input of a result not yet delivered to dest0"] == 4  # second, older
    assert plan.kept.reasons[
        "input of a series with an instance no job has used yet (the next job version lists it)"] == 2
    assert "input of a job not finished (running)" in plan.kept.reasons
    assert "input of a job not finished (queued)" in plan.kept.reasons

    outcome = policy.purge_by_age()
    assert outcome.purged[Kind.INPUT] == len(gone) and outcome.changed == 0
    assert indexed(world) == everything - gone
    kept = [*second, *older, *pending, *running, *queued, *unscheduled, *late, *processed, *young]
    assert all(world.store.path_of(r).is_file() for r in kept)
    assert not any(world.store.path_of(r).exists() for r in [*delivered, *given_up])
    # results: the old settled ones went with their outbox records, the pending one and the young one stay
    left = set(world.results.root.rglob("*.dcm"))
    assert waiting_result in left and len(left) == 4 and left < results_before  # + second's, older's
    # and the index, which C-FIND answers from, names exactly the result files left
    assert {world.store.data_dir / path for path, _ in world.store.index.results()} == left
    assert sorted(r.state for r in world.outbox.list(limit=100)) == [
        "delivered", "delivered", "pending", "pending", "pending"]
    # the index has no record of a series or study left empty
    assert {s.series_instance_uid for s in world.store.index.series()} == {
        r.series_instance_uid for r in kept}
    events = world.audit.named(PURGED)
    assert sorted(e["sop_instance_uid"] for e in events if e["kind"] == "input") == sorted(gone)
    assert all(e["age_days"] >= 30 for e in events)
    assert "PHANTOM" not in json.dumps(events)  # UIDs only: the test data's patient name and ID never

    # the pending results are delivered at last: their inputs and then they go at the next run
    for record in [r for r in world.outbox.list(limit=100) if r.state == "pending"]:
        settle(world.outbox, record, D)
    policy.purge_by_age()
    assert indexed(world) == everything - gone - {r.sop_instance_uid for r in [*pending, *second, *older]}
    assert set(world.results.root.rglob("*.dcm")) == {young_result}
    assert [world.store.data_dir / path for path, _ in world.store.index.results()] == [young_result]


def test_ages_of_zero_keep_everything_forever(world: World) -> None:
    records = world.series(2)
    world.result(world.job(records, JobState.DONE), D)
    world.clock.now += 10_000 * DAY
    policy = world.retention(RetentionSettings())
    assert not policy.enabled and policy.plan().candidates == []
    assert policy.purge_by_age().purged == {Kind.INPUT: 0, Kind.RESULT: 0}
    assert len(indexed(world)) == 2


def test_an_instance_received_again_after_the_plan_is_kept(world: World) -> None:
    [record] = world.series(1)
    world.job([record], JobState.DONE)
    world.clock.now += 31 * DAY
    policy = world.retention(RetentionSettings(inputs_days=30))
    [candidate] = policy.plan().by_age
    from tests.factories import ct_dataset
    from tests.store.test_store import put

    # the peer sends the same instance again between the plan and the deletion
    again = put(world.store, ct_dataset(record.study_instance_uid, record.series_instance_uid,
                                        record.sop_instance_uid))
    outcome = world.purger.execute([candidate])
    assert outcome.changed == 1 and outcome.purged[Kind.INPUT] == 0
    assert world.store.index.get(record.sop_instance_uid) == again
    assert world.store.path_of(again).is_file()
    assert world.purger.pending() == []


def test_a_result_queued_again_after_the_plan_is_kept(world: World) -> None:
    [record] = world.series(1)
    job = world.job([record], JobState.DONE)
    path = world.result(job, D)
    world.clock.now += 31 * DAY
    policy = world.retention(RetentionSettings(results_days=30))
    [candidate] = policy.plan().by_age
    [delivered] = world.outbox.list(limit=10)
    world.outbox.retry(delivered.id)  # an operator sends it again meanwhile
    outcome = world.purger.execute([candidate])
    assert outcome.changed == 1 and path.is_file()
    assert [r.state for r in world.outbox.list(limit=10)] == ["pending"]


def test_a_result_stays_while_its_job_runs_again_or_within_the_grace_even_above_a_mark(world: World) -> None:
    from dicom_node.retention import DiskUsage

    [record] = world.series(1)
    job = world.job([record], JobState.DONE)
    rerun = world.result(job, D)
    world.queue.requeue(job.id)  # an operator runs it again: it rewrites its result, then queues it
    # a running job's result, written in its store step and not yet queued in its outbox step
    fresh = world.results.save(ct_dataset(record.study_instance_uid))
    os.utime(fresh, (world.clock.now, world.clock.now))
    full = DiskUsage(total=10**9, used=95 * 10**7, free=5 * 10**7)
    policy = world.retention(RetentionSettings(purge_above_percent=80), usage=lambda _: full, grace_seconds=60)
    assert policy.plan().for_space == []
    kept = Kept()
    assert list(policy.planner.results_before(float("inf"), "high-water", kept)) == []
    assert kept.reasons == {"result of a job not finished (queued)": 1,
                            "result written within the grace period (its job may not have queued it yet)": 1}
    assert policy.purge_for_space().purged[Kind.RESULT] == 0 and rerun.is_file() and fresh.is_file()

    world.clock.now += 61  # past the grace, still no outbox record: nobody was asked to take it
    assert policy.purge_for_space().purged[Kind.RESULT] == 1
    assert not fresh.exists() and rerun.is_file()


def test_inputs_are_checked_again_just_before_each_batch(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dicom_node.retention.service.BATCH", 1)
    records = world.series(3)
    world.result(world.job(records, JobState.DONE), D)
    world.clock.now += 31 * DAY
    policy = world.retention(RetentionSettings(inputs_days=30))
    assert len(policy.plan().by_age) == 3  # all three listed in one page of the index
    made = []

    def late_version(_: object) -> None:
        # after the first deletion a new job version (another model version) lists the rest
        if not made:
            made.extend(r for r in records if world.store.index.get(r.sop_instance_uid))
            world.job(made, JobState.QUEUED, model_version="2")

    outcome = policy.purge_by_age(late_version)
    assert outcome.purged[Kind.INPUT] == 1 and outcome.changed == 2 and len(made) == 2
    assert indexed(world) == {r.sop_instance_uid for r in made}

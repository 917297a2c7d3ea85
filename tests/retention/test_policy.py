"""The retention rules with an injected clock: inputs and results aged past their limits go only
when everything made from them is delivered or given up; everything else stays."""

import json
from pathlib import Path

import pytest

from dicom_node.config import RetentionSettings
from dicom_node.export.outbox import DeliveryState
from dicom_node.jobs.queue import JobState
from dicom_node.retention import PURGED, Kind
from tests.retention.world import DAY, World, settle

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
    world.job(delivered, JobState.DONE, pipeline="second")  # every pipeline's jobs count
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
    late = world.series(1)  # arrived after its series' job: a newer job will use it
    queued = world.series(1)
    world.job(queued, JobState.QUEUED)
    unscheduled = world.series(1)  # no job has used it yet
    world.clock.now += 10 * DAY
    young = world.series(1)
    world.result(world.job(young, JobState.DONE), D)
    everything = indexed(world)
    results_before = set(world.results.root.rglob("*.dcm"))

    world.clock.now += 25 * DAY  # the first lot is 35 days old, the young one 25
    policy = world.retention(RetentionSettings(inputs_days=30, results_days=30))
    plan = policy.plan()
    gone = {r.sop_instance_uid for r in [*delivered, *given_up, *failed_quietly, *not_routed]}
    assert {c.sop_instance_uid for c in plan.by_age if c.kind == Kind.INPUT} == gone
    assert indexed(world) == everything  # planning deletes nothing
    assert "input of a result not yet delivered to dest1" in plan.kept.reasons
    assert plan.kept.reasons["input not yet processed (no job has used it)"] == 2
    assert "input of a job not finished (running)" in plan.kept.reasons
    assert "input of a job not finished (queued)" in plan.kept.reasons

    outcome = policy.purge_by_age()
    assert outcome.purged[Kind.INPUT] == len(gone) and outcome.changed == 0
    assert indexed(world) == everything - gone
    kept = [*pending, *running, *queued, *unscheduled, *late, *young]
    assert all(world.store.path_of(r).is_file() for r in kept)
    assert not any(world.store.path_of(r).exists() for r in [*delivered, *given_up])
    # results: the old settled ones went with their outbox records, the pending one and the young one stay
    left = set(world.results.root.rglob("*.dcm"))
    assert waiting_result in left and len(left) == 2 and left < results_before
    assert sorted(r.state for r in world.outbox.list(limit=100)) == ["delivered", "delivered", "pending"]
    # the index has no record of a series or study left empty
    assert {s.series_instance_uid for s in world.store.index.series()} == {
        r.series_instance_uid for r in kept}
    events = world.audit.named(PURGED)
    assert sorted(e["sop_instance_uid"] for e in events if e["kind"] == "input") == sorted(gone)
    assert all(e["age_days"] >= 30 for e in events)
    assert "PHANTOM" not in json.dumps(events)  # UIDs only: the test data's patient name and ID never

    # the pending result is delivered at last: its inputs and then it go at the next run
    [record] = [r for r in world.outbox.list(limit=100) if r.state == "pending"]
    settle(world.outbox, record, D)
    policy.purge_by_age()
    assert indexed(world) == everything - gone - {r.sop_instance_uid for r in pending}
    assert set(world.results.root.rglob("*.dcm")) == {p for p in left if p != waiting_result}


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

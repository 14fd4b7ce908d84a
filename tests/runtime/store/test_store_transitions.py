"""Every allowed and every refused move, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
from datetime import timezone

import pytest
from sqlalchemy.engine import Engine

from llmplan.runtime.store.errors import (
    IllegalTransitionError,
    InvalidJobDataError,
    StaleStatusError,
    TerminalJobError,
    UnknownJobError,
)
from llmplan.runtime.store.repository import (
    Artifacts,
    JobFailure,
    JobUpdate,
    MeasuredResults,
    MetricPoint,
    Placement,
    RayIds,
    create_job,
    get_job,
    get_job_details,
    job_events,
    record_metric,
    transition,
    update_job,
)
from llmplan.runtime.store.status import ALLOWED_TRANSITIONS, ErrorClass, JobStatus, is_allowed

from .factory import GiB, bring_to, failure_for, job_spec

ALL_PAIRS = list(itertools.product(JobStatus, JobStatus))
ALLOWED_PAIRS = [(a, b) for a, b in ALL_PAIRS if is_allowed(a, b)]
REFUSED_PAIRS = [(a, b) for a, b in ALL_PAIRS if not is_allowed(a, b)]


def pair_id(pair: tuple[JobStatus, JobStatus]) -> str:
    return f"{pair[0].value}->{pair[1].value}"


def test_the_pairs_cover_the_whole_table() -> None:
    assert len(ALLOWED_PAIRS) == sum(len(targets) for targets in ALLOWED_TRANSITIONS.values())
    assert len(ALLOWED_PAIRS) + len(REFUSED_PAIRS) == len(JobStatus) ** 2


@pytest.mark.parametrize("pair", ALLOWED_PAIRS, ids=pair_id)
def test_allowed_move_is_applied_with_its_event(shared_engine: Engine, pair: tuple[JobStatus, JobStatus]) -> None:
    from_status, to_status = pair
    job_id = create_job(shared_engine, job_spec()).id
    bring_to(shared_engine, job_id, from_status)
    events_before = len(job_events(shared_engine, job_id))

    moved = transition(shared_engine, job_id, to_status, message="the move under test",
                       failure=failure_for(to_status))

    stored = get_job(shared_engine, job_id)
    assert moved.status is to_status and stored.status is to_status
    events = job_events(shared_engine, job_id)
    assert len(events) == events_before + 1
    assert (events[-1].from_status, events[-1].to_status) == (from_status, to_status)
    assert events[-1].message == "the move under test"
    assert (stored.finished_at is not None) == to_status.is_terminal()
    if to_status is JobStatus.RUNNING:
        assert stored.started_at is not None
    if to_status is JobStatus.CANCELLED:
        assert stored.error_class is ErrorClass.CANCELLED
    if to_status is JobStatus.FAILED:
        assert (stored.error_class, stored.error_message) == (ErrorClass.INFRASTRUCTURE, "node lost")


@pytest.mark.parametrize("pair", REFUSED_PAIRS, ids=pair_id)
def test_refused_move_changes_nothing(shared_engine: Engine, pair: tuple[JobStatus, JobStatus]) -> None:
    from_status, to_status = pair
    job_id = create_job(shared_engine, job_spec()).id
    bring_to(shared_engine, job_id, from_status)
    before = get_job(shared_engine, job_id)
    events_before = job_events(shared_engine, job_id)

    with pytest.raises(IllegalTransitionError) as refused:
        transition(shared_engine, job_id, to_status, failure=failure_for(to_status),
                   update=JobUpdate(placement=Placement("intruder", (7,))))

    assert (refused.value.from_status, refused.value.to_status) == (from_status, to_status)
    assert f"{from_status.value} -> {to_status.value}" in str(refused.value)
    assert get_job(shared_engine, job_id).model_dump() == before.model_dump()
    assert len(job_events(shared_engine, job_id)) == len(events_before)


def test_expected_from_refuses_a_stale_move(shared_engine: Engine) -> None:
    job_id = create_job(shared_engine, job_spec()).id
    transition(shared_engine, job_id, JobStatus.SCHEDULED)
    with pytest.raises(StaleStatusError, match="the job is scheduled now"):
        transition(shared_engine, job_id, JobStatus.SCHEDULED, expected_from=JobStatus.QUEUED)
    # Stale even though scheduled -> cancelled is allowed: the caller's view was wrong.
    with pytest.raises(StaleStatusError):
        transition(shared_engine, job_id, JobStatus.CANCELLED, expected_from=JobStatus.QUEUED)
    assert get_job(shared_engine, job_id).status is JobStatus.SCHEDULED
    transition(shared_engine, job_id, JobStatus.RUNNING, expected_from=JobStatus.SCHEDULED)
    assert get_job(shared_engine, job_id).status is JobStatus.RUNNING


@pytest.mark.parametrize("failure", [None, JobFailure(ErrorClass.CANCELLED, "x")], ids=["none", "cancelled-class"])
def test_failed_needs_a_real_failure_class(shared_engine: Engine, failure: JobFailure | None) -> None:
    job_id = create_job(shared_engine, job_spec()).id
    with pytest.raises(InvalidJobDataError, match="needs a JobFailure"):
        transition(shared_engine, job_id, JobStatus.FAILED, failure=failure)
    assert get_job(shared_engine, job_id).status is JobStatus.QUEUED


def test_only_failed_and_cancelled_take_a_failure(shared_engine: Engine) -> None:
    job_id = create_job(shared_engine, job_spec()).id
    with pytest.raises(InvalidJobDataError):
        transition(shared_engine, job_id, JobStatus.SCHEDULED, failure=JobFailure(ErrorClass.OOM, "x"))
    with pytest.raises(InvalidJobDataError):
        transition(shared_engine, job_id, JobStatus.CANCELLED, failure=JobFailure(ErrorClass.OOM, "x"))
    cancelled = transition(shared_engine, job_id, JobStatus.CANCELLED,
                           failure=JobFailure(ErrorClass.CANCELLED, "cancelled by bob"))
    assert (cancelled.error_class, cancelled.error_message) == (ErrorClass.CANCELLED, "cancelled by bob")


def test_results_land_with_the_final_status(shared_engine: Engine) -> None:
    job_id = create_job(shared_engine, job_spec()).id
    bring_to(shared_engine, job_id, JobStatus.SCHEDULED)
    transition(shared_engine, job_id, JobStatus.RUNNING,
               update=JobUpdate(placement=Placement("gpu-3", (0, 1), "10.0.0.3"), ray=RayIds(job_id="raysubmit_9", actor_id="a1")))
    transition(shared_engine, job_id, JobStatus.SUCCEEDED, update=JobUpdate(
        results=MeasuredResults(peak_memory_per_gpu_bytes=(19 * GiB, 18 * GiB), tokens_per_s=2870.5, final_loss=0.81),
        artifacts=Artifacts(output_dir="/out/9", adapter_path="/out/9/adapter", log_path="/out/9/log.txt"),
    ))
    job = get_job(shared_engine, job_id)
    assert (job.placement_node, job.placement_gpus, job.placement_node_ip) == ("gpu-3", [0, 1], "10.0.0.3")
    assert (job.ray_job_id, job.ray_actor_id, job.ray_placement_group_id) == ("raysubmit_9", "a1", None)
    assert job.peak_memory_per_gpu_bytes == [19 * GiB, 18 * GiB]
    assert (job.measured_tokens_per_s, job.final_loss) == (2870.5, 0.81)
    assert (job.output_dir, job.adapter_path, job.log_path) == ("/out/9", "/out/9/adapter", "/out/9/log.txt")
    assert job.started_at is not None and job.finished_at is not None
    assert job.created_at <= job.started_at <= job.finished_at
    assert all(t.tzinfo is timezone.utc for t in (job.created_at, job.started_at, job.finished_at))


@pytest.mark.parametrize("terminal", sorted(s for s in JobStatus if s.is_terminal()), ids=lambda s: s.value)
def test_a_terminal_job_never_changes(shared_engine: Engine, terminal: JobStatus) -> None:
    job_id = create_job(shared_engine, job_spec()).id
    bring_to(shared_engine, job_id, terminal)
    before = get_job_details(shared_engine, job_id)
    with pytest.raises(TerminalJobError, match="terminal"):
        update_job(shared_engine, job_id, JobUpdate(artifacts=Artifacts(log_path="/tmp/late.log")))
    with pytest.raises(TerminalJobError):
        record_metric(shared_engine, job_id, MetricPoint(step=1, loss=1.0))
    for target in JobStatus:
        with pytest.raises(IllegalTransitionError, match="it is terminal"):
            transition(shared_engine, job_id, target, failure=failure_for(target))
    after = get_job_details(shared_engine, job_id)
    assert after.job.model_dump() == before.job.model_dump()
    assert len(after.events) == len(before.events) and after.metrics == []


def test_unknown_job_is_reported_by_id(shared_engine: Engine) -> None:
    with pytest.raises(UnknownJobError, match="no job with id 987654"):
        transition(shared_engine, 987654, JobStatus.SCHEDULED)
    with pytest.raises(UnknownJobError):
        get_job(shared_engine, 987654)
    with pytest.raises(UnknownJobError):
        update_job(shared_engine, 987654, JobUpdate())
    with pytest.raises(UnknownJobError):
        record_metric(shared_engine, 987654, MetricPoint(step=0))

"""The lifecycle table itself (no database)."""

from __future__ import annotations

import pytest

from llmplan.runtime.store.status import (
    ALLOWED_TRANSITIONS,
    FAILURE_ERROR_CLASSES,
    INITIAL_STATUS,
    TERMINAL_STATUSES,
    ErrorClass,
    JobKind,
    JobStatus,
    is_allowed,
)

from .factory import path_to


def test_stored_values_never_change_without_a_migration() -> None:
    # These strings are in every database; renaming one strands old rows.
    assert [s.value for s in JobStatus] == [
        "queued", "scheduled", "running", "cancelling", "succeeded", "failed", "cancelled"
    ]
    assert [k.value for k in JobKind] == ["finetune", "infer", "serve"]  # a new kind is appended: old rows keep theirs
    assert [e.value for e in ErrorClass] == ["oom", "user_error", "infrastructure", "cancelled"]


def test_every_status_has_a_row_in_the_table() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(JobStatus)


@pytest.mark.parametrize("status", list(JobStatus), ids=lambda s: s.value)
def test_terminal_statuses_have_no_way_out(status: JobStatus) -> None:
    assert status.is_terminal() == (status in TERMINAL_STATUSES)
    assert status.is_terminal() == (not ALLOWED_TRANSITIONS[status])


@pytest.mark.parametrize("status", list(JobStatus), ids=lambda s: s.value)
def test_every_status_is_reachable_from_the_initial_one(status: JobStatus) -> None:
    if status is not INITIAL_STATUS:
        assert path_to(status)


@pytest.mark.parametrize("status", [s for s in JobStatus if not s.is_terminal()], ids=lambda s: s.value)
def test_every_live_status_can_end(status: JobStatus) -> None:
    seen, frontier = {status}, [status]
    while frontier:
        frontier = [n for s in frontier for n in ALLOWED_TRANSITIONS[s] if n not in seen]
        seen.update(frontier)
    assert seen & TERMINAL_STATUSES == TERMINAL_STATUSES


def test_no_status_moves_to_itself_and_nothing_returns_to_running() -> None:
    for status in JobStatus:
        assert not is_allowed(status, status)
    assert {s for s in JobStatus if is_allowed(s, JobStatus.RUNNING)} == {JobStatus.SCHEDULED}


def test_only_the_requeue_goes_backwards() -> None:
    assert is_allowed(JobStatus.SCHEDULED, JobStatus.QUEUED)
    assert {s for s in JobStatus if is_allowed(s, JobStatus.QUEUED)} == {JobStatus.SCHEDULED}


def test_failure_classes_exclude_cancelled() -> None:
    assert ErrorClass.CANCELLED not in FAILURE_ERROR_CLASSES
    assert FAILURE_ERROR_CLASSES | {ErrorClass.CANCELLED} == set(ErrorClass)


def test_statuses_compare_and_print_as_their_values() -> None:
    assert JobStatus.RUNNING == "running"
    assert str(JobStatus.RUNNING) == "running"
    assert f"{JobKind.INFER}" == "infer"

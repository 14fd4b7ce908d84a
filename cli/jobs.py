"""`llmplan jobs` (the job history) and `llmplan show JOB` (everything about one job).

Both read the store through `runtime.store.reading` (SQLAlchemy Core): rows, not SQLModel objects, so neither
imports SQLModel, pydantic nor the ORM (`tests/test_light_imports.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, TypeVar

import click
from rich import box
from rich.console import Console
from rich.json import JSON
from rich.table import Table
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from llmplan.cli.render import (
    NO_VALUE,
    format_duration,
    format_number,
    format_ratio,
    format_timestamp,
    make_console,
    sparkline,
)
from llmplan.planner.units import format_gib
from llmplan.runtime.store.db import database_url_from_environment, display_url, first_line
from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.errors import DatabaseURLError, InvalidJobDataError, StoreError, UnknownJobError
from llmplan.runtime.store.reading import (
    DEFAULT_LIST_LIMIT,
    JobDetails,
    JobFilter,
    count_jobs,
    read_job_details,
    read_jobs,
    read_latest_metric,
)
from llmplan.runtime.store.status import JobKind, JobStatus

from .options import JOB_ID, ROWS, json_option, shown
from .options import UserError as BadInput

F = TypeVar("F", bound=Callable[..., Any])
Job = JobEvent = JobMetric = Any  # rows of the store's tables (`runtime.store.reading`): the columns as attributes

STATUS_STYLES = {
    JobStatus.QUEUED: "",
    JobStatus.SCHEDULED: "blue",
    JobStatus.RUNNING: "cyan",
    JobStatus.CANCELLING: "yellow",
    JobStatus.SUCCEEDED: "green",
    JobStatus.FAILED: "bold red",
    JobStatus.CANCELLED: "yellow",
}
RAY_NODE_ID = re.compile(r"[0-9a-f]{56}")  # what the scheduler records as a job's placement
RUNNING_ON = re.compile(r"on (\S+): ")  # a driver's running event names the node's IP (runtime.inference_job.start)
_RELATIVE_SINCE = re.compile(r"^\s*(?P<count>[0-9]+)\s*(?P<unit>m|min|h|d|w)\s*$", re.IGNORECASE)
_SINCE_UNITS = {"m": timedelta(minutes=1), "min": timedelta(minutes=1), "h": timedelta(hours=1),
                "d": timedelta(days=1), "w": timedelta(weeks=1)}
_SINCE_EXAMPLES = "30m, 12h, 7d, 2w, 2025-01-31 or 2025-01-31T14:00Z"
# `llmplan jobs` counts matches beyond the page up to here ("50 of 10,000+ matching jobs").
COUNT_CAP = 10_000


# ---- options shared by both commands ------------------------------------------------------------
def db_option(command: F) -> F:
    return click.option(
        "--db",
        "db_url",
        metavar="URL",
        help="Job database: a SQLite path or sqlite:///, postgresql+psycopg:// URL "
        "[default: $LLMPLAN_DB, else ~/.llmplan/llmplan.db].",
    )(command)


# ---- llmplan jobs -------------------------------------------------------------------------------
@click.command("jobs")
@db_option
@click.option("--status", "statuses", multiple=True, metavar="STATUS",
              help=f"Only jobs in this status; repeat or comma-separate ({', '.join(s.value for s in JobStatus)}).")
@click.option("--kind", metavar="KIND", help="Only finetune, infer or serve jobs.")
@click.option("--model", metavar="TEXT", help="Only jobs whose model name contains TEXT (any case).")
@click.option("--since", metavar="WHEN", help=f"Only jobs created since WHEN: {_SINCE_EXAMPLES} (UTC).")
@click.option("--limit", type=ROWS, default=DEFAULT_LIST_LIMIT, show_default=True, metavar="N",
              help="Show at most N jobs.")
@json_option
def jobs(db_url: str | None, statuses: tuple[str, ...], kind: str | None, model: str | None,
         since: str | None, limit: int, as_json: bool) -> None:
    """List recorded jobs, newest first."""
    job_filter = JobFilter(
        statuses=parse_statuses(statuses),
        kind=parse_kind(kind),
        model=model.strip() if model and model.strip() else None,
        since=parse_since(since, now=datetime.now(timezone.utc)) if since is not None else None,
        limit=limit,
    )
    with open_engine(db_url) as (engine, where):
        found = read_jobs(engine, job_filter)
        full_page = len(found) == job_filter.limit
        total = count_jobs(engine, job_filter, at_most=COUNT_CAP) if full_page else len(found)
        servers = serving_notes(engine, found)
    if as_json:
        emit_json([job_to_json(job) | ({"serving": servers[job.id]} if job.id in servers else {}) for job in found])
        return
    filtered = job_filter != JobFilter(limit=job_filter.limit)
    render_job_list(make_console(), found, total=total, where=where, filtered=filtered, servers=servers)


# ---- llmplan show -------------------------------------------------------------------------------
@click.command("show")
@click.argument("job_id", metavar="JOB", type=JOB_ID)
@db_option
@json_option
def show(job_id: int, db_url: str | None, as_json: bool) -> None:
    """Everything about one job: plan vs measurements, events and its loss curve."""
    with open_engine(db_url) as (engine, where):
        details = read_job_details(engine, job_id)
    if as_json:
        emit_json(details_to_json(details))
        return
    render_job_details(make_console(), details)


# ---- input parsing ------------------------------------------------------------------------------
def parse_statuses(values: tuple[str, ...]) -> tuple[JobStatus, ...]:
    names = [name.strip().lower() for value in values for name in value.split(",") if name.strip()]
    known = {status.value: status for status in JobStatus}
    for name in names:
        if name not in known:
            raise BadInput(f"--status: unknown status {name!r}; choose from {', '.join(known)}")
    return tuple(dict.fromkeys(known[name] for name in names))


def parse_kind(value: str | None) -> JobKind | None:
    if value is None:
        return None
    known = {kind.value: kind for kind in JobKind}
    name = value.strip().lower()
    if name not in known:
        raise BadInput(f"--kind: unknown kind {value!r}; choose from {', '.join(known)}")
    return known[name]


def parse_since(text: str, *, now: datetime) -> datetime:
    """`30m`, `12h`, `7d`, `2w` before `now`, or an ISO date/time (UTC when it names no zone)."""
    relative = _RELATIVE_SINCE.match(text)
    if relative:
        try:
            return now - int(relative["count"]) * _SINCE_UNITS[relative["unit"].lower()]
        except (OverflowError, ValueError):
            raise BadInput(f"--since: {shown(text.strip())} reaches before the year 1; use {_SINCE_EXAMPLES}") from None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise BadInput(f"--since: cannot read {shown(text)} as a time; use {_SINCE_EXAMPLES}") from None



# ---- the database -------------------------------------------------------------------------------
@contextmanager
def open_engine(db_url: str | None) -> Iterator[tuple[Engine, str]]:
    """The store's engine and a printable name for it; store errors become one-line CLI errors."""
    url_text = database_url_from_environment(db_url)
    try:
        engine = open_store(url_text)
    except DatabaseURLError as error:
        raise BadInput(str(error)) from None
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    try:
        yield engine, display_url(engine.url)
    except UnknownJobError as error:  # a job id that names no job is the user's error, like any bad input
        raise BadInput(f"no job {error.job_id} in {display_url(engine.url)}: "
                       "`llmplan jobs` lists the recorded jobs") from None
    except InvalidJobDataError as error:
        raise BadInput(str(error)) from None
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    except DBAPIError as error:
        raise click.ClickException(f"database error on {display_url(engine.url)}: {first_line(error.orig)}") from None
    finally:
        engine.dispose()


# ---- JSON ---------------------------------------------------------------------------------------
def emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, ensure_ascii=False))


def job_to_json(job: Job) -> dict[str, Any]:
    return row_to_json(job)


def row_to_json(row: Job | JobEvent | JobMetric) -> dict[str, Any]:
    """The row's columns in table order, JSON-ready (ISO-8601 UTC times ending in Z, enum values)."""
    return {name: json_value(value) for name, value in row._mapping.items()}


def json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Enum):
        return value.value
    return value


def details_to_json(details: JobDetails) -> dict[str, Any]:
    return {
        "job": job_to_json(details.job),
        "planned_vs_measured": comparison_to_json(compare_plan(details.job)),
        "events": [row_to_json(event) for event in details.events],
        "metrics": [row_to_json(metric) for metric in details.metrics],
    }


# ---- planned vs measured ------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanComparison:
    planned_memory_per_gpu_bytes: int | None
    measured_peak_memory_per_gpu_bytes: list[int] | None
    planned_tokens_per_s: float | None
    measured_tokens_per_s: float | None
    final_loss: float | None
    on_cpu: bool = False  # the plan runs on the CPU: memory is per process, not per GPU

    @property
    def memory_unit(self) -> str:
        """What one memory figure is measured on: a GPU, or a CPU process (a training rank)."""
        return "process" if self.on_cpu else "GPU"

    @property
    def measured_peak_memory_bytes(self) -> int | None:
        """The busiest GPU's peak: what the plan's per-GPU figure must cover."""
        peaks = self.measured_peak_memory_per_gpu_bytes
        return max(peaks) if peaks else None


def compare_plan(job: Job) -> PlanComparison:
    return PlanComparison(
        planned_memory_per_gpu_bytes=job.planned_memory_per_gpu_bytes,
        measured_peak_memory_per_gpu_bytes=job.peak_memory_per_gpu_bytes,
        planned_tokens_per_s=job.planned_tokens_per_s,
        measured_tokens_per_s=job.measured_tokens_per_s,
        final_loss=job.final_loss,
        on_cpu=(job.plan or {}).get("device") == "cpu",
    )


def comparison_to_json(comparison: PlanComparison) -> dict[str, Any]:
    def ratio(measured: float | None, planned: float | None) -> float | None:
        return measured / planned if measured is not None and planned else None

    return {
        "peak_memory_per_gpu_bytes": {
            "planned": comparison.planned_memory_per_gpu_bytes,
            "measured": comparison.measured_peak_memory_bytes,
            "measured_per_gpu": comparison.measured_peak_memory_per_gpu_bytes,
            "measured_over_planned": ratio(comparison.measured_peak_memory_bytes,
                                           comparison.planned_memory_per_gpu_bytes),
        },
        "tokens_per_s": {
            "planned": comparison.planned_tokens_per_s,
            "measured": comparison.measured_tokens_per_s,
            "measured_over_planned": ratio(comparison.measured_tokens_per_s, comparison.planned_tokens_per_s),
        },
        "final_loss": comparison.final_loss,
    }


# ---- tables -------------------------------------------------------------------------------------
def serving_notes(engine: Engine, found: list[Job]) -> dict[int, str]:
    """Each running server's address, requests answered and tokens/s (`llmplan serve`), by job id."""
    servers = [job for job in found if job.kind is JobKind.SERVE and job.status is JobStatus.RUNNING]
    if not servers:
        return {}
    from llmplan.runtime.infer.serve import serving_text

    return {job.id: serving_text(job, read_latest_metric(engine, job.id)) for job in servers}


def render_job_list(console: Console, found: list[Job], *, total: int, where: str, filtered: bool,
                    servers: dict[int, str] | None = None) -> None:
    if not found:
        console.print(f"No jobs match in {where}." if filtered else f"No jobs recorded in {where} yet.")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for header, justify in (("ID", "right"), ("NAME", "left"), ("KIND", "left"), ("STATUS", "left"),
                            ("MODEL", "left"), ("SUBMITTER", "left"), ("CREATED (UTC)", "left"),
                            ("RAN", "right"), ("PLACEMENT", "left"), ("ERROR", "left")):
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    if servers:
        table.add_column("SERVING", no_wrap=True)
    now = datetime.now(timezone.utc)
    for job in found:
        table.add_row(
            str(job.id),
            job.name,
            job.kind.value,
            styled_status(job.status),
            job.model,
            job.submitter,
            format_timestamp(job.created_at, seconds=False),
            format_duration(run_time(job, now)),
            placement_text(job),
            job.error_class.value if job.error_class else "",
            *([servers.get(job.id, "")] if servers else []),
        )
    console.print(table)
    if total > len(found):
        plus = "+" if total >= COUNT_CAP else ""
        console.print(f"{len(found)} of {total:,}{plus} matching jobs, newest first; --limit N shows more.")


def render_job_details(console: Console, details: JobDetails) -> None:
    job = details.job
    now = datetime.now(timezone.utc)
    console.print(f"[bold]Job {job.id}[/bold]  {job.name}  ({job.kind.value})  {styled_status(job.status)}")
    console.print(_summary_table(job, now, details.events, details.metrics))
    console.print()
    console.print("[bold]Planned vs measured[/bold]")
    console.print(_comparison_table(compare_plan(job)))
    console.print()
    console.print("[bold]Events[/bold]")
    console.print(_events_table(job, details.events))
    curve = loss_curve_lines(details.metrics)
    if curve:
        console.print()
        console.print("[bold]Loss curve[/bold]")
        for line in curve:
            console.print(line, markup=False)
    for title, document in (("Request", job.request), ("Plan", job.plan)):
        if document:
            console.print()
            console.print(f"[bold]{title}[/bold]")
            console.print(JSON.from_data(document))


def _summary_table(job: Job, now: datetime, events: Sequence[JobEvent], metrics: Sequence[JobMetric] = ()) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    retry = f" (retry of job {job.retry_of})" if job.retry_of is not None else ""
    rows = [
        ("model", job.model),
        ("submitter", job.submitter),
        ("priority", str(job.priority)),
        ("attempt", f"{job.attempt}{retry}"),
        ("created", f"{format_timestamp(job.created_at)} UTC"),
        ("started", _utc(job.started_at)),
        ("finished", _utc(job.finished_at)),
        ("ran", format_duration(run_time(job, now))),
        ("placement", placement_text(job, events) or NO_VALUE),
        ("ray", ray_text(job) or NO_VALUE),
    ]
    if job.error_class is not None:
        rows.append(("error", f"{job.error_class.value}: {job.error_message or ''}".rstrip(": ")))
    if job.kind is JobKind.SERVE:
        from llmplan.runtime.infer.serve import serving_text

        rows.append(("serving", serving_text(job, metrics[-1] if metrics else None)))
    rows += [(label, value) for label, value in (("output dir", job.output_dir), ("adapter", job.adapter_path),
                                                 ("log", job.log_path)) if value]
    for label, value in rows:
        table.add_row(label, value)
    return table


def _comparison_table(comparison: PlanComparison) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("")
    table.add_column("PLANNED", justify="right")
    table.add_column("MEASURED", justify="right")
    table.add_column("MEASURED/PLANNED", justify="right")
    planned_memory = comparison.planned_memory_per_gpu_bytes
    measured_memory = comparison.measured_peak_memory_bytes
    table.add_row(
        f"peak memory per {comparison.memory_unit}",
        format_gib(planned_memory) if planned_memory is not None else NO_VALUE,
        format_gib(measured_memory) if measured_memory is not None else NO_VALUE,
        format_ratio(measured_memory, planned_memory),
    )
    peaks = comparison.measured_peak_memory_per_gpu_bytes or []
    if len(peaks) > 1:
        for index, peak in enumerate(peaks):
            table.add_row(f"  {comparison.memory_unit} {index}", "", format_gib(peak), format_ratio(peak, planned_memory))
    table.add_row(
        "throughput (tokens/s)",
        format_number(comparison.planned_tokens_per_s),
        format_number(comparison.measured_tokens_per_s),
        format_ratio(comparison.measured_tokens_per_s, comparison.planned_tokens_per_s),
    )
    table.add_row("final loss", "", format_number(comparison.final_loss, 4), "")
    return table


def _events_table(job: Job, events: list[JobEvent]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for header in ("TIME (UTC)", "+", "FROM", "TO", "MESSAGE"):
        table.add_column(header, no_wrap=header != "MESSAGE")
    for event in events:
        table.add_row(
            format_timestamp(event.at),
            format_duration(event.at - job.created_at),
            event.from_status.value if event.from_status else "",
            styled_status(event.to_status),
            event.message,
        )
    return table


def loss_curve_lines(metrics: list[JobMetric], width: int = 60) -> list[str]:
    """A sparkline of the loss and its landmarks; nothing when fewer than two points have a loss."""
    points = [(metric.step, metric.loss) for metric in metrics if metric.loss is not None]
    if len(points) < 2:
        return []
    losses = [loss for _, loss in points]
    best_step, best_loss = min(points, key=lambda point: point[1])
    return [
        f"  {sparkline(losses, width)}",
        f"  steps {points[0][0]}-{points[-1][0]} ({len(points)} points): first {losses[0]:.4f}, "
        f"min {best_loss:.4f} at step {best_step}, last {losses[-1]:.4f}",
    ]


# ---- small formatting helpers -------------------------------------------------------------------
def styled_status(status: JobStatus) -> str:
    style = STATUS_STYLES.get(status, "")
    return f"[{style}]{status.value}[/{style}]" if style else status.value


def run_time(job: Job, now: datetime) -> timedelta | None:
    if job.started_at is None:
        return None
    return (job.finished_at or now) - job.started_at


def placement_text(job: Job, events: Sequence[JobEvent] = ()) -> str:
    if job.placement_node is None:
        return ""
    node = node_text(job.placement_node_ip or job.placement_node, events)
    gpus = ",".join(str(gpu) for gpu in job.placement_gpus or [])
    return f"{node} GPU {gpus}" if gpus else node


def node_text(node: str, events: Sequence[JobEvent] = ()) -> str:
    """The node as users know it: its IP (recorded at placement, or reported by the job's driver when it
    started: "on IP: ..."); rows from before the store kept the IP have only Ray's 56-character node id,
    shown by its first 12 characters when no event names the IP."""
    if not RAY_NODE_ID.fullmatch(node):
        return node
    reported = (RUNNING_ON.match(event.message or "") for event in events if event.to_status is JobStatus.RUNNING)
    return next((match.group(1) for match in reported if match), f"node {node[:12]}")


def ray_text(job: Job) -> str:
    parts = (("job", job.ray_job_id), ("actor", job.ray_actor_id), ("placement group", job.ray_placement_group_id))
    return ", ".join(f"{label} {value}" for label, value in parts if value)


def _utc(moment: datetime | None) -> str:
    return f"{format_timestamp(moment)} UTC" if moment is not None else NO_VALUE

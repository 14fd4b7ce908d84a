"""`llmplan cluster`: the Ray cluster's nodes, their GPUs (NVML on each node), free memory and jobs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import click

from .jobs import db_option, open_engine
from .options import json_option, print_json

GIB = 2**30


@contextlib.contextmanager
def cluster_errors() -> Iterator[None]:
    """A cluster that cannot be reached or started: its one line on stderr, exit 1 (the system failed)."""
    from llmplan.runtime.jobs.cluster import ClusterError

    try:
        yield
    except ClusterError as error:
        raise click.ClickException(str(error)) from None


def reachable_address(ctx: click.Context, param: click.Parameter, address: str | None) -> str | None:
    """--address's check, before anything else runs: where nothing answers, one line and exit 1 at once (Ray
    would retry it for minutes)."""
    from llmplan.runtime.jobs.cluster import check_reachable

    if address:
        with cluster_errors():
            check_reachable(address, "--address")
    return address


@click.group("cluster", invoke_without_command=True)
@click.option("--address", metavar="HOST:PORT", callback=reachable_address,
              help="Ray cluster [default: $LLMPLAN_RAY_ADDRESS, else the local head].")
@db_option
@json_option
@click.pass_context
def cluster(ctx: click.Context, address: str | None, db_url: str | None, as_json: bool) -> None:
    """Show the cluster: nodes, GPUs and their memory, the jobs placed on each, and the queue."""
    if ctx.invoked_subcommand is not None:
        return
    from llmplan.runtime.jobs.cluster import nodes
    from llmplan.runtime.jobs.scheduler import ensure_scheduler, worker_database_url

    with open_engine(db_url) as (engine, _), cluster_errors():
        ensure_scheduler(worker_database_url(engine), address)
        views = nodes()
        placed, queued = placed_and_queued(engine)
    document = cluster_document(views, placed, queued)
    if as_json:
        print_json(document)
    else:
        render(document)


@cluster.command("stop")
def stop() -> None:
    """Stop llmplan's local Ray head (and whatever runs on it); the job store keeps every record."""
    from llmplan.runtime.jobs.cluster import stop_local_head

    click.echo("stopped llmplan's local Ray head" if stop_local_head() else "llmplan's local Ray head is not running")


def placed_and_queued(engine: Any) -> tuple[list[Any], int]:
    from llmplan.runtime.jobs.scheduler import PLACED_STATUSES
    from llmplan.runtime.store.reading import count_jobs
    from llmplan.runtime.store.repository import JobFilter, JobStatus, list_jobs

    placed = list_jobs(engine, JobFilter(statuses=tuple(JobStatus(s) for s in PLACED_STATUSES), limit=10_000))
    return placed, count_jobs(engine, JobFilter(statuses=(JobStatus.QUEUED,)))


def cluster_document(views: list[Any], placed: list[Any], queued: int) -> dict[str, Any]:
    from llmplan.runtime.jobs.admission import available_bytes, demand_of
    from llmplan.runtime.jobs.scheduler import reservation_of

    reservations = [reservation_of(job) for job in placed]
    available = available_bytes([slot for view in views for slot in view.gpus], reservations)
    nodes = []
    for view in views:
        gpus = []
        for slot in view.gpus:
            jobs = [r.job_id for r in reservations if slot.key in r.gpus]
            gpus.append({"index": slot.index, "name": slot.name, "total_bytes": slot.total_bytes,
                         "free_bytes": slot.free_bytes, "available_bytes": available[slot.key], "jobs": jobs})
        cpu_jobs = [job.id for job in placed
                    if job.placement_node == view.node_id and not demand_of(job.kind.value, job.plan).on_gpus]
        nodes.append({"node_id": view.node_id, "address": view.address, "head": view.is_head, "cpus": view.cpus,
                      "gpu_source": view.gpu_source, "gpus": gpus, "cpu_jobs": cpu_jobs})
    return {"nodes": nodes, "running": [{"id": j.id, "status": j.status.value, "name": j.name} for j in placed],
            "queued": queued}


def render(document: dict[str, Any]) -> None:
    for node in document["nodes"]:
        role = "head" if node["head"] else "worker"
        click.echo(f"node {node['node_id'][:12]} ({role}, {node['address']}): {node['cpus']:g} CPUs, "
                   f"{len(node['gpus'])} GPU(s) [{node['gpu_source']}]")
        for gpu in node["gpus"]:
            free = "" if gpu["free_bytes"] is None else f", {gpu['free_bytes'] / GIB:.1f} GiB free (NVML)"
            jobs = f", jobs {', '.join(map(str, gpu['jobs']))}" if gpu["jobs"] else ""
            click.echo(f"  GPU {gpu['index']} {gpu['name']}: {gpu['total_bytes'] / GIB:.1f} GiB{free}, "
                       f"{gpu['available_bytes'] / GIB:.1f} GiB available to plans{jobs}")
        if node["cpu_jobs"]:
            click.echo(f"  CPU jobs: {', '.join(map(str, node['cpu_jobs']))}")
    click.echo(f"{len(document['running'])} job(s) placed, {document['queued']} queued")

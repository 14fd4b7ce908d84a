"""What every submission shares: the cluster it goes to, the queue options, the fit check, the hand-off."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import click

from .cluster import reachable_address

PRIORITY_HELP = "Higher runs first; equal priorities run in submission order."


def scheduling_options(command):
    options = [
        click.option("--priority", type=int, default=0, show_default=True, help=PRIORITY_HELP),
        click.option("--max-retries", type=click.IntRange(0, 10), default=2, show_default=True,
                     help="Re-planned retries after running out of memory."),
        click.option("--address", metavar="HOST:PORT", callback=reachable_address,
                     help="Ray cluster [default: $LLMPLAN_RAY_ADDRESS, else llmplan's local Ray head]."),
        click.option("--wait", is_flag=True, help="Follow the job until it ends; exit 1 if it failed."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


class Cluster:
    """The cluster a job is submitted to. Joined on first use (after the request's own checks, so a bad
    data file is reported without starting Ray): its scheduler (running), and its GPUs as they are now."""

    def __init__(self, engine: Any, address: str | None) -> None:
        self.engine, self.address = engine, address

    @cached_property
    def scheduler(self) -> Any:
        from llmplan.runtime.cluster import ClusterError
        from llmplan.runtime.scheduler import ensure_scheduler, worker_database_url

        try:
            return ensure_scheduler(worker_database_url(self.engine), self.address)
        except ClusterError as error:  # the system failed, not the input: exit 1
            raise click.ClickException(str(error)) from None

    @cached_property
    def slots(self) -> list[Any]:
        scheduler = self.scheduler
        import ray  # after ensure_scheduler has connected (see cluster.connect)

        return ray.get(scheduler.inventory.remote(True))

    def hardware(self, gpus: int | None):
        """What to plan for: the cluster's GPUs (its largest node), or None for the CPU."""
        from llmplan.runtime.cluster import cluster_hardware

        return cluster_hardware(self.slots, gpus)

    def refuse_if_never_fits(self, kind: str, plan: Any) -> None:
        from llmplan.runtime.admission import demand_of, never_fits

        reason = never_fits(demand_of(kind, plan.to_dict()), self.slots)
        if reason is not None:
            raise click.ClickException(f"refused: {reason}; plan for this cluster with `llmplan fit` "
                                       "(--gpus, --method qlora) or add GPUs")

    def wake(self) -> None:
        """Tell the scheduler a job was queued, so that it need not wait for its next cycle."""
        self.scheduler.poke.remote()

    def request_fields(self, plan: Any, max_retries: int, gpus: int | None) -> dict[str, Any]:
        """What the scheduler reads from a job's request, besides its plan."""
        from llmplan.runtime.model_store import cache_root
        from llmplan.runtime.paths import jobs_dir
        from llmplan.runtime.scheduler import RUNNER_KEY, SCHEDULER_RUNNER

        hardware = self.hardware(gpus) if plan.device == "cuda" else None
        return {RUNNER_KEY: SCHEDULER_RUNNER, "max_retries": max_retries, "jobs_dir": str(jobs_dir()), "model_cache": str(cache_root()),
                "hardware": hardware.to_dict() if hardware else None}


def queued_document(job_id: int, plan: Any) -> dict[str, Any]:
    """What a submission answers (`llmplan submit --json`, the dashboard): the job's id, its plan and its log."""
    from llmplan.runtime.paths import LOG_NAME, job_folder

    return {"id": job_id, "plan": plan.to_dict(), "log": str(job_folder(None, job_id) / LOG_NAME)}


def report_queued(engine: Any, job_id: int, plan: Any, as_json: bool, wait: bool) -> None:
    """Print the queued job's id (or JSON), and follow it when asked."""
    from .options import print_json
    from .submit import follow

    queued = queued_document(job_id, plan)
    if as_json and not wait:
        print_json(queued)
        return
    click.echo(f"job {job_id} queued: {plan.summary()}; log {queued['log']}", err=True)
    if not as_json:
        click.echo(job_id)
    if wait:
        final = follow(engine, job_id)
        if as_json:
            print_json({"id": job_id, "status": final.status.value, "output_dir": final.output_dir,
                        "adapter_path": final.adapter_path, "final_loss": final.final_loss,
                        "error": final.error_message})
        if final.status.value != "succeeded":
            raise SystemExit(1)

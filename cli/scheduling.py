"""What every submission shares: the cluster it goes to, the queue options, the fit check, the hand-off."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import click

from .options import PRIORITY, UserError
from .cluster import reachable_address

PRIORITY_HELP = "Higher runs first; equal priorities run in submission order."


class ModelError(UserError):
    """A --model that cannot run here: the message says what to pass instead."""

    field = "model"  # the option (and the dashboard's form field) at fault


def smaller_cpu_plan(kind: str, workers_that_fit: int) -> str:
    """What to pass instead of a CPU plan the cluster cannot hold (the options of that kind's submit command)."""
    if kind == "finetune" and workers_that_fit > 0:
        return f"pass --workers {workers_that_fit}"
    smaller = "--method lora or a shorter --seq-len" if kind == "finetune" else "a smaller --batch-size or --prompt-len"
    return f"pass a smaller model, {smaller}, or add a node with more memory"


def store_jobs_root(engine: Any) -> Path:
    """The job store's folder of job folders (logs, outputs), the same on every node: job 1 of another
    store never shares it."""
    from llmplan.runtime.paths import store_jobs_dir
    from llmplan.runtime.scheduler import worker_database_url

    return store_jobs_dir(worker_database_url(engine))


def scheduling_options(command):
    options = [
        click.option("--priority", type=PRIORITY, default=0, show_default=True, help=PRIORITY_HELP),
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

    @cached_property
    def cpu_nodes(self) -> list[Any]:
        """Every live node's CPUs and host memory."""
        self.scheduler  # noqa: B018 - joins the cluster first
        from llmplan.runtime.admission import cpu_node
        from llmplan.runtime.cluster import alive_nodes

        return [cpu_node(node) for node in alive_nodes()]

    @cached_property
    def jobs_root(self) -> Path:
        return store_jobs_root(self.engine)

    def refuse_if_never_fits(self, kind: str, plan: Any) -> None:
        """Refuse (exit 1, nothing queued) a plan this cluster could not run even when idle, saying what to pass."""
        from llmplan.runtime.admission import cpu_capacity, cpu_demand_of, demand_of, never_fits, never_fits_on_cpus

        recorded = plan.to_dict()
        reason = never_fits(demand_of(kind, recorded), self.slots, self.cpu_nodes)
        if reason is not None:
            raise click.ClickException(f"refused: {reason}; plan for this cluster with `llmplan fit` "
                                       "(--gpus, --method qlora) or add GPUs")
        cpu_demand = cpu_demand_of(kind, recorded)
        reason = never_fits_on_cpus(cpu_demand, self.cpu_nodes)
        if reason is not None:
            fitting = cpu_capacity(cpu_demand, self.cpu_nodes)
            raise click.ClickException(f"refused: {reason}; {smaller_cpu_plan(kind, fitting)}")

    def wake(self) -> None:
        """Tell the scheduler a job was queued, so that it need not wait for its next cycle."""
        self.scheduler.poke.remote()

    def request_fields(self, plan: Any, max_retries: int, gpus: int | None) -> dict[str, Any]:
        """What the scheduler reads from a job's request, besides its plan."""
        from llmplan.runtime.model_store import cache_root
        from llmplan.runtime.scheduler import RUNNER_KEY, SCHEDULER_RUNNER

        hardware = self.hardware(gpus) if plan.device == "cuda" else None
        return {RUNNER_KEY: SCHEDULER_RUNNER, "max_retries": max_retries, "jobs_dir": str(self.jobs_root),
                "model_cache": str(cache_root()), "hardware": hardware.to_dict() if hardware else None}


def prepare_model(model: str) -> None:
    """Make the model runnable here before anything is queued (pull or convert once, with progress), or
    refuse it (exit 2) with what to pass instead: a catalog model llmplan cannot download, a missing path."""
    from llmplan.runtime.model_store import ModelStoreError, ensure_model

    from .commands import weights_placeholder

    try:
        local = ensure_model(model, progress=True)
    except ModelStoreError as error:
        spec = catalog_only(model)
        if spec is not None:
            raise ModelError(f"--model {model}: {spec.name} has no local weights and llmplan cannot download them: "
                            f"pass --model {weights_placeholder(spec.name)} (its Hugging Face or Meta checkpoint "
                            "directory)") from None
        raise ModelError(f"--model {model}: {error}") from None
    if local.converted_now:
        click.echo(local.note, err=True)


def catalog_only(model: str) -> Any:
    """The catalog entry that `model` names (or abbreviates: 7B) when llmplan can plan it but not pull it;
    None for paths, unknown names and the models llmplan pulls itself."""
    from llmplan.planner.resolve import ModelConfigError, UnknownModelError, resolve_model
    from llmplan.runtime.model_store import find_runnable

    if Path(model).expanduser().exists() or any(separator in model for separator in ("/", "\\")):
        return None
    try:
        spec = resolve_model(model).spec
    except (UnknownModelError, ModelConfigError):
        return None
    return spec if find_runnable(spec.name) is None else None


def say_if_device_changed(gpus: int | None, plan: Any) -> None:
    """One line when GPUs were asked for but the cluster has none, so the plan is for the CPU."""
    if gpus and plan.device == "cpu":
        click.echo(f"note: --gpus {gpus} asked for GPUs but the cluster has none: planned for the CPU instead",
                   err=True)


def queued_document(job_id: int, plan: Any, jobs_root: Path) -> dict[str, Any]:
    """What a submission answers (`llmplan submit --json`, the dashboard): the job's id, its plan and its log."""
    from llmplan.runtime.paths import LOG_NAME, job_folder

    return {"id": job_id, "plan": plan.to_dict(), "log": str(job_folder(jobs_root, job_id) / LOG_NAME)}


def report_queued(engine: Any, job_id: int, plan: Any, jobs_root: Path, as_json: bool, wait: bool) -> None:
    """Print the queued job's id (or JSON), and follow it when asked."""
    from .options import print_json
    from .submit import follow

    queued = queued_document(job_id, plan, jobs_root)
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

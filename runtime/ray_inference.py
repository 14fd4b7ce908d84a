"""Inference in Ray actors: one actor per model replica, holding the GPUs its plan asks for."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from llmplan.planner.plan import InferencePlan

from .chat import PromptItem
from .inference import GenerationReport, GenerationSettings, cleanup, respond, setup, stream_report
from .prompt_templates import apply_template, resolve_template


class InferenceReplica:
    """One copy of the model (sharded over its GPUs when the plan says so), loaded once, serving prompts
    in the prompt template `template` resolves to (`prompt_templates.resolve_template`)."""

    def __init__(self, model_dir: str, dtype: str, quant: str, device: str, adapter: str | None,
                 template: str = "auto") -> None:
        self.template = resolve_template(template, model_dir, adapter)
        self.generator = setup(model_dir, dtype=dtype, quant=quant, device=device, adapter=adapter)

    def prompt(self, item: PromptItem) -> PromptItem:
        """What the model is asked for `item`: the text (or dialog) in the replica's template."""
        return apply_template(self.template, item)

    def respond(self, items: Sequence[PromptItem], settings: GenerationSettings) -> GenerationReport:
        return respond(self.generator, [self.prompt(item) for item in items], settings)

    def stream(self, item: PromptItem, settings: GenerationSettings) -> Iterator[str | GenerationReport]:
        """Text pieces as they are generated (a Ray streaming generator), then the call's report."""
        yield from stream_report(self.generator, self.prompt(item), settings)

    def node(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {"node": ray.util.get_node_ip_address(), "node_id": context.get_node_id(),
                "gpus": [int(g) for g in ray.get_gpu_ids()], "actor": context.get_actor_id(),
                "job": context.get_job_id()}

    def close(self) -> None:
        cleanup(self.generator)


def runtime_device(plan: InferencePlan) -> str:
    """What `setup` loads onto: one GPU, every GPU of the actor (HF device_map="auto"), or the CPU."""
    if plan.device == "cpu":
        return "cpu"
    return "auto" if plan.gpus_per_replica > 1 else "cuda"


def start_replicas(plan: InferencePlan, model_dir: str, adapter: str | None, template: str = "auto") -> list[Any]:
    import ray

    remote = ray.remote(InferenceReplica)
    return [
        remote.options(num_gpus=plan.gpus_per_replica, num_cpus=1).remote(
            model_dir, plan.dtype, plan.quant, runtime_device(plan), adapter, template)
        for _ in range(plan.replicas)
    ]


def share(items: Sequence[PromptItem], replicas: int) -> list[list[int]]:
    """Indices of the prompts each replica answers: contiguous, as even as possible, order kept."""
    size, extra = divmod(len(items), replicas)
    shares, start = [], 0
    for index in range(replicas):
        end = start + size + (1 if index < extra else 0)
        shares.append(list(range(start, end)))
        start = end
    return shares


def stop_replicas(replicas: Sequence[Any]) -> None:
    import ray

    for replica in replicas:
        ray.kill(replica, no_restart=True)

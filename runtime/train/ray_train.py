"""Ray Train for the training recipe: `run_ray_train(config, on_metrics)` runs the whole run in
`config.workers` Ray Train workers, each running `train.run_rank` (which uses `distributed`'s engines).

Metrics from Ray workers reach the driver through a small actor (`MetricsSink`): rank 0 sends each
`StepMetrics` to it without waiting, a driver thread drains it every `POLL_SECONDS` and calls `on_metrics`
in step order while `TorchTrainer.fit()` runs; rank 0 leaves its `TrainResult` there at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmplan.runtime.train.train import StepMetrics, TrainResult, run_rank
from llmplan.runtime.train.train_config import TrainConfig

POLL_SECONDS = 0.5


@dataclass
class MetricsSink:
    """A Ray actor between rank 0 and the driver: metrics in, in order; the result at the end."""

    pending: list[Any] = field(default_factory=list)
    result: Any = None

    def put(self, metrics: Any) -> None:
        self.pending.append(metrics)

    def drain(self) -> list[Any]:
        taken, self.pending = self.pending, []
        return taken

    def finish(self, result: Any) -> None:
        self.result = result

    def outcome(self) -> Any:
        return self.result


def run_ray_train(config: TrainConfig, on_metrics: Callable[[StepMetrics], None] | None = None) -> TrainResult:
    """Train in `config.workers` Ray Train workers (one per GPU, or per CPU slot on the CPU) and return rank 0's
    result. Each logged step reaches `on_metrics` on this process (from a forwarding thread, in step order)
    while the workers train. A worker's exception is raised here as itself (Ray's wrapper as its cause)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llmplan.runtime.jobs.cluster import ensure_ray

    ensure_ray()
    sink = ray.remote(num_cpus=0)(MetricsSink).remote()
    env = {"DS_ACCELERATOR": "cpu"} if config.device == "cpu" and config.backend == "deepspeed" else {}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config.to_dict(), "sink": sink},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.device == "cuda"),
        run_config=RunConfig(name="train", storage_path=str(Path(config.output_dir).resolve() / "ray"),
                             worker_runtime_env={"env_vars": env} if env else None),
    )
    try:
        _fit(trainer, _Forwarder(sink, on_metrics))
        result = ray.get(sink.outcome.remote())
    finally:
        ray.kill(sink)
    if result is None:
        raise RuntimeError("the training workers ended without a result: see the Ray worker logs")
    return result


def _fit(trainer: Any, forwarder: "_Forwarder") -> None:
    forwarder.start()
    try:
        trainer.fit()
    except Exception as error:
        cause = _worker_error(error)
        if cause is error:
            raise
        raise cause from error
    finally:
        forwarder.stop()
    forwarder.raise_error()


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the recipe, with its rank and device from Ray Train's context."""
    import ray
    import ray.train
    import ray.train.torch

    config = TrainConfig.from_dict(loop_config["config"])
    sink = loop_config["sink"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    result = run_rank(config, rank=rank, world_size=context.get_world_size(), device=str(ray.train.torch.get_device()),
                      on_metrics=sink.put.remote if rank == 0 else None)
    if rank == 0:
        ray.get(sink.finish.remote(result))


class _Forwarder:
    """A driver thread handing the sink's metrics to `on_metrics`; its first error is raised after the run."""

    def __init__(self, sink: Any, on_metrics: Callable[[Any], None] | None) -> None:
        self.sink = sink
        self.on_metrics = on_metrics
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="llmplan-train-metrics")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self._forward()  # what arrived after the last poll

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            self._forward()

    def _forward(self) -> None:
        import ray

        if self.error is not None:
            return
        try:
            for metrics in ray.get(self.sink.drain.remote()):
                if self.on_metrics is not None:
                    self.on_metrics(metrics)
        except Exception as error:  # noqa: BLE001 - raised on the driver once training has ended
            self.error = error


def _worker_error(error: Exception) -> Exception:
    """The lowest rank's own exception out of Ray Train's WorkerGroupError (the error itself otherwise)."""
    from llmplan.runtime.jobs.failures import root_cause

    failures = getattr(error, "worker_failures", None) or {}
    if not failures:
        return error
    first = failures[min(failures)]
    return root_cause(first)

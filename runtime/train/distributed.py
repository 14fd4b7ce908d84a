"""Data parallelism for the training recipe: one engine interface over a single process, DDP and DeepSpeed
(`runtime.ray_train` starts the processes).

    engine = prepare(model, optimizer, config, world_size=2, device=device, precision=precision)
    with engine.accumulating(last=False), engine.autocast():
        loss = engine.module(**batch).loss
        engine.backward(loss)
    ...
    engine.step()                                   # clip, optimizer step, zero the gradients

Loss convention: the recipe hands `backward` this process's share of the global batch's token-mean loss
(the sum of its token losses over the number of loss tokens in the whole global batch, every rank and
micro-batch together). The shares add up to the global loss; DDP and DeepSpeed average gradients over the
ranks, so `backward` multiplies by the world size. The gradient is then the same whichever way the global
batch is split into ranks and micro-batches, which is what lets 2 workers match 1.

- single process: `TorchEngine` without a wrapper.
- DDP: `torch.nn.parallel.DistributedDataParallel` with `gradient_as_bucket_view=True` (the gradients live in
  the communication buckets, no second copy: what the memory estimator assumes); `no_sync` on every
  micro-batch but the last of an optimizer step. gloo on the CPU, nccl on GPUs (Ray Train's TorchConfig
  picks it from `use_gpu`).
- DeepSpeed: `deepspeed_config(config)` from the plan (ZeRO stage, CPU offload, bf16 / fp16, micro-batch,
  accumulation, clipping). The optimizer is always the client's torch optimizer from
  `modeling.make_optimizer` (`zero_allow_untested_optimizer`, `zero_force_ds_cpu_optimizer` off): it runs
  with ZeRO-1/2/3 on GPUs and on the CPU alike, where DeepSpeed's own CPU Adam would first have to be
  compiled (a C++ build on first use). With `offload optimizer` the torch AdamW then steps the fp32
  partitions on the CPU. DeepSpeed's bf16 / fp16 modes keep fp32 master weights in the ZeRO optimizer and
  cast the model itself, so the recipe's autocast is off under DeepSpeed; `bf16-true` and `bf16-mixed` both
  run as DeepSpeed's bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llmplan.planner.estimator import ZERO3_GATHERED_LAYERS
from llmplan.planner.request import Precision

from llmplan.runtime.train.train_config import TrainConfig

DEEPSPEED_TAG = "deepspeed"  # the sub-folder of a checkpoint that DeepSpeed writes
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass(frozen=True)
class PrecisionSetup:
    """How a precision mode (planner.request.Precision) runs: the weights' dtype, autocast, loss scaling."""

    weights: str  # the dtype the model is loaded in (runtime.modeling names: bf16, fp16, fp32)
    autocast: torch.dtype | None  # the forward's autocast dtype (mixed precision)
    loss_scaling: bool  # fp16: a GradScaler keeps small gradients from flushing to zero


PRECISIONS = {
    Precision.BF16_TRUE: PrecisionSetup("bf16", None, False),
    Precision.BF16_MIXED: PrecisionSetup("fp32", torch.bfloat16, False),
    Precision.FP16_TRUE: PrecisionSetup("fp16", None, True),
    Precision.FP16_MIXED: PrecisionSetup("fp32", torch.float16, True),
    Precision.FP32: PrecisionSetup("fp32", None, False),
}



# ---- the DeepSpeed configuration ------------------------------------------------------------------
def deepspeed_config(config: TrainConfig, gathered_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config that runs `config` (the optimizer stays the client's torch optimizer).

    ZeRO-3 with `gathered_params` (`zero3_gathered_params`): DeepSpeed keeps at most that many parameters
    gathered and prefetches one layer, what the planner's estimate counts (its defaults allow 1e9)."""
    zero: dict[str, Any] = {"stage": config.zero}
    if config.zero == 3 and gathered_params:
        layer = gathered_params // ZERO3_GATHERED_LAYERS
        zero.update(stage3_max_live_parameters=gathered_params, stage3_prefetch_bucket_size=layer,
                    stage3_max_reuse_distance=layer)
    pin = config.device == "cuda"
    if config.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if config.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.global_batch,
        "gradient_clipping": config.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": config.precision.startswith("bf16")},
        "fp16": {"enabled": config.precision.startswith("fp16"), "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # the client's torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # ... also when the optimizer is offloaded
        "steps_per_print": 2**31 - 1,  # the recipe logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


def zero3_loading(config: TrainConfig) -> Any | None:
    """Under ZeRO-3, the object that makes transformers' `from_pretrained` build the model already partitioned
    (inside `deepspeed.zero.Init`: each rank holds 1/N of the weights from the start, never the whole model).
    transformers holds it by weak reference only: keep it for the whole run, then `release_zero3_loading`.
    None for every other backend."""
    gathered = zero3_gathered_params(config)
    if gathered is None:
        return None
    deepspeed = import_deepspeed(config.device)
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopt the process group before zero.Init
    return HfDeepSpeedConfig(deepspeed_config(config, gathered))


def zero3_gathered_params(config: TrainConfig) -> int | None:
    """The planner's count of parameters ZeRO-3 holds gathered, for the model `config` trains; None below ZeRO-3."""
    if config.backend != "deepspeed" or config.zero != 3:
        return None
    from llmplan.planner.estimator import zero3_gathered_params as planned
    from llmplan.planner.resolve import resolve_model

    return planned(resolve_model(config.model).spec)


def release_zero3_loading() -> None:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


# ---- engines --------------------------------------------------------------------------------------
@dataclass(eq=False)
class TorchEngine:
    """One process, or DDP: backward (scaled by GradScaler for fp16), clipping, the optimizer step."""

    module: Any  # what the forward runs on: the DDP wrapper, or the model itself
    model: Any  # the unwrapped model (PEFT or HF): what is saved
    optimizer: Any
    world_size: int
    max_grad_norm: float
    autocast_dtype: torch.dtype | None
    device: torch.device
    scaler: Any = None  # torch.amp.GradScaler for fp16
    ddp: bool = False

    @contextlib.contextmanager
    def accumulating(self, *, last: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward: DDP all-reduces the gradients only on the last one."""
        with contextlib.nullcontext() if last or not self.ddp else self.module.no_sync():
            yield

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        loss = loss * self.world_size
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def gathered(self) -> contextlib.AbstractContextManager:
        """Every parameter whole on this rank (they always are without ZeRO-3)."""
        return contextlib.nullcontext()

    def save(self, directory: Path, rank: int) -> None:
        """The trainable weights and the optimizer (and loss scaler) state; rank 0 writes, the others wait."""
        from safetensors.torch import save_file

        if rank == 0:
            weights = {name: p.detach().cpu().contiguous() for name, p in self.model.named_parameters()
                       if p.requires_grad}
            save_file(weights, str(directory / TRAINABLE_FILE))
            state = {"optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None}
            torch.save(state, directory / OPTIMIZER_FILE)
        barrier()

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(directory / TRAINABLE_FILE))
        parameters = dict(self.model.named_parameters())
        missing = sorted(set(n for n, p in parameters.items() if p.requires_grad) - set(weights))
        if missing:
            raise CheckpointMismatch(directory, f"it has no weights for {missing[0]} (and {len(missing) - 1} more)")
        with torch.no_grad():
            for name, tensor in weights.items():
                if name not in parameters or parameters[name].shape != tensor.shape:
                    raise CheckpointMismatch(directory, f"its weight {name} does not fit this model")
                parameters[name].copy_(tensor)
        state = load_state(directory / OPTIMIZER_FILE, self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])


@dataclass(eq=False)
class DeepSpeedEngine:
    """A DeepSpeed engine behind the same interface; DeepSpeed counts micro-batches and steps at the boundary."""

    module: Any  # deepspeed.DeepSpeedEngine (its forward runs the model)
    model: Any
    world_size: int
    zero: int

    def accumulating(self, *, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed knows the boundary from its own micro-step count

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed casts the model for bf16 / fp16 itself

    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        # scale_wrt_gas=False: the loss is already this micro-batch's share of the global batch's mean.
        self.module.backward(loss * self.world_size, scale_wrt_gas=False)
        if not last:
            self.module.step()  # DeepSpeed wants step() after every backward; off the boundary it only counts

    def step(self) -> None:
        self.module.step()  # the boundary: clipping, optimizer step, zeroing, as the DeepSpeed config says

    def gathered(self) -> contextlib.AbstractContextManager:
        if self.zero != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def save(self, directory: Path, rank: int) -> None:
        """Every rank writes its optimizer partition; rank 0 the trainable weights (frozen ones are left out)."""
        self.module.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        barrier()

    def load(self, directory: Path) -> None:
        refuse_unsafe_deepspeed_files(directory / DEEPSPEED_TAG)
        path, _ = self.module.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointMismatch(directory, "DeepSpeed found no checkpoint in it")


Engine = TorchEngine | DeepSpeedEngine


class CheckpointMismatch(RuntimeError):
    def __init__(self, directory: Path, why: str) -> None:
        super().__init__(f"cannot resume from {directory}: {why}; resume with the configuration that wrote it, "
                         "or start again in a new output_dir")


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file holding more than tensors and plain values: refused, none of its code run."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"cannot resume from {path.parent}: {path.name} is not a checkpoint llmplan wrote ({why}); "
                         "it was refused unread: remove that checkpoint folder or start again in a new output_dir")


def load_state(path: Path, map_location: Any = "cpu") -> Any:
    """A `torch.save` file read by torch's restricted unpickler (weights_only): tensors, numbers, strings, lists,
    tuples and dicts only. A pickle planted in a checkpoint folder cannot run code here: it is refused."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:  # or not a torch.save file
        raise UnsafeCheckpoint(path, _unpickler_reason(error)) from None


# What DeepSpeed (0.19) pickles beside tensors and plain values in its checkpoint files (seen in ZeRO-2 and ZeRO-3
# bf16 checkpoints; the dynamic scaler of fp16): its loss scaler, the ZeRO stage enum and its fragment addresses.
DEEPSPEED_CHECKPOINT_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def refuse_unsafe_deepspeed_files(directory: Path) -> None:
    """DeepSpeed's `load_checkpoint` unpickles its files unrestricted (torch.load weights_only=False): read each
    file's pickle opcodes first, without running them, and refuse one that names a global beyond tensors, plain
    values and `DEEPSPEED_CHECKPOINT_GLOBALS` (or is no torch.save zip), so that a planted file never runs."""
    for path in sorted(directory.glob("*.pt")):
        try:
            named = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as error:  # noqa: BLE001 - not a torch.save zip (a bare pickle torch.load would still run)
            raise UnsafeCheckpoint(path, f"not a torch checkpoint: {type(error).__name__}") from None
        unexpected = sorted(named - DEEPSPEED_CHECKPOINT_GLOBALS)
        if unexpected:
            raise UnsafeCheckpoint(path, f"it names {', '.join(unexpected[:3])}")


def _unpickler_reason(error: Exception) -> str:
    """The line of torch's long refusal that says what the file asked for ("Unsupported global: GLOBAL posix.system")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "nsupported" in line and "GLOBAL" in line), None) or \
        next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
    return reason[:200] or type(error).__name__


def prepare(model: Any, optimizer: Any, config: TrainConfig, *, world_size: int, device: torch.device,
            precision: PrecisionSetup) -> Engine:
    """Wrap the model and optimizer for `config.backend`; the process group must exist when world_size > 1
    (Ray Train creates it; under torchrun, `init_process_group` first)."""
    if config.backend != "single" and not dist.is_initialized():
        raise RuntimeError(f"backend {config.backend} needs a torch.distributed process group: run through "
                           "run_ray_train (or call torch.distributed.init_process_group first)")
    if config.backend == "deepspeed":
        return _deepspeed_engine(model, optimizer, config, world_size)
    module = model
    if config.backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        module = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    scaler = torch.amp.GradScaler(device.type) if precision.loss_scaling else None
    return TorchEngine(module, model, optimizer, world_size, config.max_grad_norm, precision.autocast, device,
                       scaler, ddp=config.backend == "ddp")


def _deepspeed_engine(model: Any, optimizer: Any, config: TrainConfig, world_size: int) -> DeepSpeedEngine:
    deepspeed = import_deepspeed(config.device)
    ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                         config=deepspeed_config(config, zero3_gathered_params(config)))
    return DeepSpeedEngine(ds_engine, ds_engine.module, world_size, config.zero)


def import_deepspeed(device: str) -> Any:
    """deepspeed, with a clear error when it is missing; on the CPU without its shared-memory all-reduce.

    On the CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce kernel (a C++
    build of about a minute on first use in every fresh environment) that only its inference path calls
    (`inference_all_reduce`); training all-reduces through torch.distributed (gloo). Marking the op as not
    buildable (in DeepSpeed's per-process table of compatible ops) skips the compile; training is the same.
    """
    try:
        import deepspeed
    except ImportError:
        raise ImportError("backend deepspeed needs DeepSpeed: pip install --no-build-isolation deepspeed "
                          "(after torch)") from None
    if device == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def trainable_parameters(model: Any) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


# ---- collectives (no-ops in one process) ----------------------------------------------------------
def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_across(values: Sequence[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks."""
    if not distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather_across(value: Any) -> list[Any]:
    """Every rank's value, in rank order."""
    if not distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if distributed():
        dist.barrier()

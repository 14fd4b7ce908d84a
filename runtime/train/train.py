"""Fine-tuning on one rank: the training recipe, reading top to bottom (setup, train, cleanup).

    state = setup(config)                               # rank 0 of 1; Ray Train workers pass their rank
    result = train(state, on_metrics=print)             # StepMetrics every `log_every` steps on rank 0
    result.adapter_dir, result.final_loss, result.tokens_per_s
    cleanup(state)

`setup` seeds every RNG, loads the tokenizer and the model the runtime's way (`runtime.modeling`:
`load_pretrained`, `prepare_for_training`, `make_optimizer`, the allocator), builds
the data (`runtime.data.build_datasets`), the cosine schedule with linear warmup and the engine
(`runtime.distributed.prepare`: one process, DDP or DeepSpeed), and with `config.resume` restores the latest
checkpoint. Precision (`distributed.PRECISIONS`): bf16-true trains bf16 weights (LoRA adapters stay fp32, as PEFT keeps
them); bf16-mixed and fp16-mixed keep fp32 weights and autocast the forward (fp16 with a GradScaler); QLoRA
loads the base in NF4 and freezes it in the compute dtype (no fp32 upcast: attention stays on a fused SDPA
kernel). On CUDA, Liger's kernels (`config.kernels`) replace RMSNorm, RoPE, SwiGLU and the loss; LoRA runs long
enough to pay the compile back can run each decoder layer through torch.compile (`compile_that_runs`; Liger then
keeps only its fused loss); summary.json records whether they ran compiled (`recipe.compile`).

`train` runs optimizer steps until `max_steps` (or `epochs` over the data). One step is `grad_accum`
micro-batches on every rank; its loss is the mean over every loss token of the global batch, whatever the
split into ranks and micro-batches (see `runtime.distributed`), so 2 workers compute what 1 does. The data
order is a `DistributedSampler` permutation per epoch (seeded, the same for any world size: rank r takes
every W-th index), consumed in whole steps; the tail that does not fill a step is left out of that epoch.

Checkpoints (`output_dir/checkpoints/step-N`, every `save_every` steps, the last 2 kept) hold the trainable
weights, the optimizer, the scheduler, the step, the data position, the loss history and every rank's RNG
states: a resumed run continues exactly where the saved one was (same next batch, same next loss). Rank 0
writes everything but DeepSpeed's optimizer partitions (each rank writes its own). At the end rank 0 writes
the PEFT adapter (`output_dir/adapter`, for `PeftModel.from_pretrained`) or the full model
(`output_dir/model`) with the tokenizer, `loss.png` and `summary.json`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from llmplan.planner.defaults import ALL_LINEAR

from llmplan.runtime.text.data import IGNORE_INDEX, TrainingData, build_datasets, collate, model_inputs, pad_token_id
from llmplan.runtime.train.distributed import (
    PRECISIONS,
    Engine,
    PrecisionSetup,
    barrier,
    gather_across,
    load_state,
    prepare,
    release_zero3_loading,
    sum_across,
    zero3_loading,
)
from llmplan.runtime.models.modeling import (
    LoraSettings,
    compiled_layers,
    configure_allocator,
    kernels_that_run,
    liger_installed,
    load_pretrained,
    make_optimizer,
    prepare_for_training,
)
from llmplan.runtime.train.train_config import CHECKPOINTS, STATE_FILE, TrainConfig, TrainConfigError

TEST_OOM_ENV = "LLMPLAN_TEST_OOM_ABOVE_MICRO_BATCH"
KEEP_CHECKPOINTS = 2
# Regional compilation, measured on an H200 (BENCHMARKS.md, "Closing the LoRA target"; Llama-3-8B shape, LoRA r 16
# on every linear layer, 2 x 2,048 tokens, bf16): 13-20 s to compile, then 1.3-1.4x the eager recipe's tokens/s,
# i.e. at least a fifth of the eager time saved. The eager recipe ran ~3.2e14 model FLOP/s there (4 x parameters
# per token: the forward and the backward to the inputs); slower cards save more seconds for the same work.
COMPILE_SECONDS = 20.0
COMPILE_SAVES = 0.2  # fraction of the eager time
EAGER_FLOPS_PER_S = 3.2e14
COMPILE_BREAK_EVEN_FLOPS = COMPILE_SECONDS / COMPILE_SAVES * EAGER_FLOPS_PER_S  # 3.2e16: ~1M tokens of an 8B model
# Whether `compile` auto (None) compiles where the run pays the compile back. On: the H200 probe
# (benchmarks/results/compile-grad-h200.jsonl) shows compiled LoRA gradients as far from eager's as eager's own
# from eager on another SDPA kernel or Liger's layers (2.8e-2 vs 2.1-2.8e-2), lora_A's first gradient exactly zero
# in every variant, and compiled losses between eager's and an fp32 run's: Inductor keeps fp32 where eager rounds
# to bf16 (and loses 92% of each small LoRA update); with its casts emulated it follows eager to 1e-5.
COMPILE_BY_DEFAULT = True


# ---- what the recipe reports ----------------------------------------------------------------------
@dataclass(frozen=True)
class StepMetrics:
    step: int  # optimizer steps done
    epoch: float  # epochs done (fractional)
    loss: float  # mean loss per token over the step's global batch
    lr: float  # the learning rate the step used
    tokens_per_s: float  # tokens (padding excluded, all ranks) per second of training since the last log
    memory_bytes: int | None  # rank 0's peak: torch.cuda.max_memory_reserved (since training began), or on the
    # CPU the process's peak RSS since it started (a Ray worker's is the run's own)
    tokens: int  # tokens trained on so far, all ranks
    eval_loss: float | None = None  # mean loss per token over the validation set, when evaluated at this step


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float | None  # the last step's training loss
    eval_loss: float | None  # at the end (None without validation data)
    tokens_per_s: float  # over the whole run's training time
    peak_memory_per_rank: tuple[int | None, ...]
    output_dir: str
    adapter_dir: str | None  # LoRA / QLoRA
    model_dir: str | None  # full fine-tuning
    summary_path: str
    plot_path: str | None
    resumed_from: int | None = None  # the checkpoint step this run continued from


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int  # whole optimizer steps in one pass over this rank's share of the data
    total_steps: int


@dataclass(frozen=True)
class DataPosition:
    epoch: int
    micro_batch: int  # micro-batches of this epoch already trained on (the same count on every rank)


@dataclass(eq=False)
class TrainState:
    """Everything a run holds between setup and cleanup; `train` advances it, checkpoints save it."""

    config: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    precision: PrecisionSetup
    tokenizer: Any
    engine: Engine
    scheduler: Any
    train_data: TrainingData
    val_data: TrainingData
    data_stats: Any
    schedule: Schedule
    step: int = 0
    position: DataPosition = DataPosition(0, 0)
    tokens: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # every StepMetrics, as dicts
    resumed_from: int | None = None
    zero3_loading: Any = None  # ZeRO-3: what keeps transformers partitioning the model (distributed.zero3_loading)

    @property
    def model(self) -> Any:
        """The trained model (PEFT or HF), unwrapped from DDP / DeepSpeed."""
        return self.engine.model


# ---- setup ----------------------------------------------------------------------------------------
def setup(config: TrainConfig, *, rank: int = 0, world_size: int = 1, device: str | None = None) -> TrainState:
    """Load, build and (with `config.resume`) restore everything one rank trains with."""
    checkpoint = _checked_run(config, world_size)
    torch_device = _device(config, device)
    seed_everything(config.seed)
    precision = PRECISIONS[config.precision]
    tokenizer = load_tokenizer(config.model)
    train_data, val_data, stats = build_datasets(config.data, tokenizer, config.seq_len, config.seed)
    schedule = plan_schedule(config, len(train_data), world_size)
    partitioned = zero3_loading(config)
    model = build_model(config, precision, None if partitioned else torch_device, planned_tokens(config, schedule))
    optimizer = make_optimizer(model, config.optimizer, config.lr)
    for group in optimizer.param_groups:  # make_optimizer keeps torch's default; the config decides
        group["weight_decay"] = config.weight_decay
    scheduler = cosine_with_warmup(optimizer, config.warmup_steps, schedule.total_steps)
    engine = prepare(model, optimizer, config, world_size=world_size, device=torch_device, precision=precision)
    state = TrainState(config, rank, world_size, torch_device, precision, tokenizer, engine, scheduler,
                       train_data, val_data, stats, schedule, zero3_loading=partitioned)
    if checkpoint is not None:
        restore(state, checkpoint)
    return state


def _checked_run(config: TrainConfig, world_size: int) -> Path | None:
    """The checkpoint to resume from (None: start afresh), once the run is known to be possible."""
    if world_size != config.workers:
        raise TrainConfigError(f"the config plans {config.workers} worker(s) but {world_size} process(es) run it: "
                               "start as many processes as config.workers")
    if not (Path(config.model) / "config.json").is_file():
        raise TrainConfigError(f"{config.model} is not a Hugging Face model directory (no config.json): resolve "
                               "catalog names and Meta checkpoints to a local directory first (model_store)")
    checkpoint = latest_checkpoint(config.output_dir)
    if checkpoint is not None and not config.resume:
        raise TrainConfigError(f"{config.output_dir} already holds checkpoints ({checkpoint.name}): resume to "
                               "continue that run, or choose a new output_dir")
    return checkpoint


def _device(config: TrainConfig, device: str | None) -> torch.device:
    if config.device == "cuda":
        if not torch.cuda.is_available():
            raise TrainConfigError("the config trains on cuda but this process sees no GPU: plan for device cpu")
        configure_allocator()  # before the first CUDA allocation
        chosen = torch.device(device or f"cuda:{torch.cuda.current_device()}")
        torch.cuda.set_device(chosen)
        return chosen
    return torch.device(device or "cpu")


def seed_everything(seed: int) -> None:
    """The same seed on every rank: the same LoRA initialisation everywhere (DDP also broadcasts rank 0's)."""
    import numpy

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def load_tokenizer(model_dir: str) -> Any:
    """The model's tokenizer; batches are padded on the right (`data.collate`) with the pad or EOS token."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def plan_schedule(config: TrainConfig, examples: int, world_size: int) -> Schedule:
    per_rank = math.ceil(examples / world_size)  # DistributedSampler pads the last round with repeats
    per_step = config.micro_batch * config.grad_accum
    steps_per_epoch = per_rank // per_step
    if steps_per_epoch == 0:
        raise TrainConfigError(f"{examples} training sequences make {per_rank} per worker, fewer than one step's "
                               f"{per_step} (micro_batch x grad_accum): lower them or add data")
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    return Schedule(steps_per_epoch, total)


def planned_tokens(config: TrainConfig, schedule: Schedule) -> int:
    """The tokens one rank will train on at most (full rows): what a compile has to pay itself back over."""
    return schedule.total_steps * config.grad_accum * config.micro_batch * config.seq_len


def compile_that_runs(config: TrainConfig, parameters: int, tokens: int) -> str:
    """Regional compilation (`layers`) where it was measured to train as eager does and faster: LoRA on a 16-bit
    base in bf16-true on CUDA, without gradient checkpointing, on one process or DDP (QLoRA, full fine-tuning,
    checkpointing and DeepSpeed were not measured; Inductor is off on the CPU). Asked for, it runs there; by
    default (with COMPILE_BY_DEFAULT) only where the run pays the compile back (`compile_pays_back`)."""
    measured = (config.device == "cuda" and config.method == "lora" and config.precision == "bf16-true"
                and not config.gradient_checkpointing and config.backend != "deepspeed")
    if config.compile == "none" or not measured:
        return "none"
    if config.compile == "layers" or (COMPILE_BY_DEFAULT and compile_pays_back(parameters, tokens)):
        return "layers"
    return "none"


def compile_pays_back(parameters: int, tokens: int) -> bool:
    """The time regional compilation saves over `tokens` of a model of `parameters` exceeds its compile time."""
    return 4 * parameters * tokens >= COMPILE_BREAK_EVEN_FLOPS


def build_model(config: TrainConfig, precision: PrecisionSetup, device: torch.device | None,
                tokens: int = 0) -> Any:
    """The model to train: full (every weight trainable), LoRA, or QLoRA (NF4 base kept frozen in the compute
    dtype, `modeling.prepare_for_training`), its decoder layers compiled where `compile_that_runs` says so for
    `tokens` planned tokens. `device` None: ZeRO-3 builds it partitioned and places the partitions itself."""
    quant = "nf4" if config.method == "qlora" else "none"
    model = load_pretrained(config.model, precision.weights, quant, str(device) if device else None)
    lora = None
    if config.method in ("lora", "qlora"):
        targets = config.lora_targets[0] if config.lora_targets == (ALL_LINEAR,) else config.lora_targets
        lora = LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout, targets)
    capability = torch.cuda.get_device_capability() if config.device == "cuda" else None
    kernels = kernels_that_run(config.kernels, model.config.model_type, config.device, capability,
                               liger_installed=liger_installed())
    compile_layers = compile_that_runs(config, model.num_parameters(), tokens) == "layers"
    return prepare_for_training(model, config.method, config.gradient_checkpointing, lora, kernels,
                                activation_offload=config.activation_offload, compile_layers=compile_layers)


def cosine_with_warmup(optimizer: Any, warmup_steps: int, total_steps: int) -> Any:
    """Linear warmup from 0 to the peak lr over `warmup_steps`, then a half cosine to 0 at `total_steps`."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, min(warmup_steps, total_steps), total_steps)


# ---- train ----------------------------------------------------------------------------------------
def run_rank(config: TrainConfig, *, rank: int = 0, world_size: int = 1, device: str | None = None,
             on_metrics: Callable[[StepMetrics], None] | None = None) -> TrainResult:
    """One rank's whole run: set up, train, clean up (a Ray Train worker runs this; one CPU process by itself)."""
    state = setup(config, rank=rank, world_size=world_size, device=device)
    try:
        return train(state, on_metrics=on_metrics)
    finally:
        cleanup(state)


def train(state: TrainState, on_metrics: Callable[[StepMetrics], None] | None = None) -> TrainResult:
    """Train to the schedule's last step; rank 0 calls `on_metrics` with every logged step, then saves."""
    config, schedule = state.config, state.schedule
    batches = micro_batches(state)
    logged_tokens, logged_seconds = 0, 0.0
    eval_loss = None
    reset_peak_memory(state.device)
    while state.step < schedule.total_steps:
        lr = state.scheduler.get_last_lr()[0]
        started = time.perf_counter()
        fail_injected_out_of_memory(config, state.step)
        loss, tokens = train_step(state, [next(batches) for _ in range(config.grad_accum)])
        seconds = time.perf_counter() - started
        state.step += 1
        state.tokens += tokens
        state.train_seconds += seconds
        logged_tokens, logged_seconds = logged_tokens + tokens, logged_seconds + seconds
        last = state.step == schedule.total_steps
        eval_loss = evaluate(state) if last or (config.eval_every and state.step % config.eval_every == 0) else None
        if last or eval_loss is not None or state.step % config.log_every == 0:
            report(state, StepMetrics(state.step, state.step / schedule.steps_per_epoch, loss, lr,
                                      logged_tokens / logged_seconds if logged_seconds else 0.0,
                                      peak_memory(state.device), state.tokens, eval_loss), on_metrics)
            logged_tokens, logged_seconds = 0, 0.0
        if state.step % config.save_every == 0:
            save_checkpoint(state)
    if eval_loss is None and state.history and state.history[-1]["step"] == state.step:
        eval_loss = state.history[-1]["eval_loss"]  # resumed at the end: the saved run evaluated already
    return finish(state, eval_loss)


def fail_injected_out_of_memory(config: TrainConfig, step: int) -> None:
    """The test hook of the scheduler's re-planning: with $LLMPLAN_TEST_OOM_ABOVE_MICRO_BATCH=N, a run
    whose micro-batch exceeds N raises torch's out-of-memory error at its first step boundary."""
    limit = os.environ.get(TEST_OOM_ENV)
    if limit is not None and step == 0 and config.micro_batch > int(limit):
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by ${TEST_OOM_ENV}={limit}: micro-batch "
                                     f"{config.micro_batch} > {limit})")


def micro_batches(state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches from the saved data position on, epoch after epoch; advances the position."""
    epoch, start = state.position.epoch, state.position.micro_batch
    collate_fn = partial(collate, pad_id=pad_token_id(state.tokenizer))
    while True:
        order = epoch_order(state, epoch)
        for index in range(start, len(order)):
            state.position = DataPosition(epoch, index + 1)
            yield collate_fn([state.train_data[i] for i in order[index]])
        epoch, start = epoch + 1, 0


def epoch_order(state: TrainState, epoch: int) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) for one epoch: whole optimizer steps only."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(state.train_data, num_replicas=state.world_size, rank=state.rank, shuffle=True,
                                 seed=state.config.seed, drop_last=False)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    size = state.config.micro_batch
    used = state.schedule.steps_per_epoch * state.config.grad_accum * size
    return [indices[i:i + size] for i in range(0, used, size)]


def train_step(state: TrainState, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """One optimizer step over `grad_accum` micro-batches: (the global batch's mean token loss, its tokens)."""
    engine = state.engine
    loss_tokens = int(sum_across([sum(_loss_tokens(batch) for batch in batches)], state.device)[0])
    total = torch.zeros((), dtype=torch.float64, device=state.device)
    tokens = 0
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        tokens += int(batch["attention_mask"].sum())  # padding excluded
        inputs = model_inputs(batch, state.device)
        with engine.accumulating(last=last):
            with engine.autocast():
                # num_items_in_batch: HF's loss sums the token losses and divides by this count of the whole
                # global batch, so the micro-batch losses (over every rank) add up to the global mean.
                loss = engine.module(**inputs, num_items_in_batch=max(loss_tokens, 1)).loss
            engine.backward(loss, last=last)
        total += loss.detach().to(torch.float64)
    engine.step()
    state.scheduler.step()
    global_loss, global_tokens = sum_across([total.item(), tokens], state.device)
    return global_loss, int(global_tokens)


def _loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: HF's causal LM loss predicts labels[:, 1:]."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def evaluate(state: TrainState) -> float | None:
    """Mean loss per token over the validation set, every rank taking every W-th example; None without one."""
    data = state.val_data
    if len(data) == 0:
        return None
    model = state.engine.model
    size = state.config.micro_batch
    shard = list(range(state.rank, len(data), state.world_size))
    rounds = math.ceil(math.ceil(len(data) / state.world_size) / size)  # the same on every rank (ZeRO-3 gathers)
    collate_fn = partial(collate, pad_id=pad_token_id(state.tokenizer))
    loss_sum, count = 0.0, 0
    model.eval()
    with torch.no_grad(), state.engine.autocast():
        for round_ in range(rounds):
            indices = shard[round_ * size:(round_ + 1) * size]
            batch = collate_fn([data[i] for i in (indices or [0])])
            batch = model_inputs(batch, state.device)
            summed = model(**batch, num_items_in_batch=1).loss  # with a count of 1, HF's loss is the sum
            if indices:
                loss_sum += float(summed)
                count += _loss_tokens(batch)
    model.train()
    loss_sum, count = sum_across([loss_sum, count], state.device)
    return loss_sum / count if count else None


def report(state: TrainState, metrics: StepMetrics, on_metrics: Callable[[StepMetrics], None] | None) -> None:
    state.history.append(asdict(metrics))
    if state.rank == 0 and on_metrics is not None:
        on_metrics(metrics)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """torch.cuda.max_memory_reserved on a GPU (what the estimator predicts); the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    if sys.platform.startswith("linux"):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return None


# ---- checkpoints ----------------------------------------------------------------------------------
def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step}"


def saved_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a save cut short leaves a `.partial` folder, never a step-N)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = saved_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(state: TrainState) -> Path:
    """Write step-N (through step-N.partial, renamed when complete) and drop all but the last two."""
    final = checkpoint_dir(state.config.output_dir, state.step)
    partial_dir = final.with_name(final.name + ".partial")
    if state.rank == 0:
        shutil.rmtree(partial_dir, ignore_errors=True)
        partial_dir.mkdir(parents=True)
    barrier()
    state.engine.save(partial_dir, state.rank)
    rng = gather_across(rng_states(state.device))
    if state.rank == 0:
        torch.save(trainer_state(state, rng), partial_dir / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        partial_dir.rename(final)
        for old in saved_checkpoints(state.config.output_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
    barrier()
    return final


def trainer_state(state: TrainState, rng: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "step": state.step, "position": asdict(state.position), "tokens": state.tokens,
        "train_seconds": state.train_seconds, "history": list(state.history), "world_size": state.world_size,
        "scheduler": state.scheduler.state_dict(), "rng": rng,
    }


def restore(state: TrainState, directory: Path) -> None:
    """Continue from a checkpoint: weights, optimizer, scheduler, step, data position, history, RNG states."""
    saved = load_state(directory / STATE_FILE)  # plain values and tensors only: a planted pickle runs no code
    if saved["world_size"] != state.world_size:
        raise TrainConfigError(f"{directory} was written by {saved['world_size']} worker(s), this run has "
                               f"{state.world_size}: resume with workers {saved['world_size']}")
    state.engine.load(directory)
    state.scheduler.load_state_dict(saved["scheduler"])
    state.step = saved["step"]
    state.position = DataPosition(**saved["position"])
    state.tokens = saved["tokens"]
    state.train_seconds = saved["train_seconds"]
    state.history = list(saved["history"])
    state.resumed_from = saved["step"]
    set_rng_states(saved["rng"][state.rank], state.device)


def rng_states(device: torch.device) -> dict[str, Any]:
    import numpy

    name, keys, position, has_gauss, cached_gaussian = numpy.random.get_state()
    # numpy's key array as a list: the checkpoint holds only what torch's restricted unpickler reads back.
    states = {"python": random.getstate(), "numpy": (name, keys.tolist(), position, has_gauss, cached_gaussian),
              "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    import numpy

    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    numpy.random.set_state((name, numpy.asarray(keys, dtype=numpy.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


# ---- the end of the run ---------------------------------------------------------------------------
def finish(state: TrainState, eval_loss: float | None) -> TrainResult:
    """Rank 0 saves the adapter or model, the loss plot and summary.json; every rank gets the result."""
    out = Path(state.config.output_dir)
    peaks = tuple(gather_across(peak_memory(state.device)))
    peft = state.config.method in ("lora", "qlora")
    artifact = out / ("adapter" if peft else "model")
    with state.engine.gathered():  # ZeRO-3: every rank takes part in gathering the weights
        if state.rank == 0:
            save_artifact(state, artifact)
    final_loss = next((h["loss"] for h in reversed(state.history)), None)
    tokens_per_s = state.tokens / state.train_seconds if state.train_seconds else 0.0
    plot = out / "loss.png"
    result = TrainResult(
        steps=state.step, final_loss=final_loss, eval_loss=eval_loss, tokens_per_s=tokens_per_s,
        peak_memory_per_rank=peaks, output_dir=str(out), adapter_dir=str(artifact) if peft else None,
        model_dir=None if peft else str(artifact), summary_path=str(out / "summary.json"), plot_path=str(plot),
        resumed_from=state.resumed_from,
    )
    if state.rank == 0:
        plot_loss(state.history, plot)
        write_summary(state, result)
    barrier()
    return result


def save_artifact(state: TrainState, directory: Path) -> None:
    """The PEFT adapter (adapter_config.json + weights) or the full HF model, with the tokenizer and the
    prompt template it was trained with (`llmplan_template.json`, which `generate` and `chat` apply)."""
    from llmplan.runtime.text.data import ALPACA_PROMPT_NO_INPUT
    from llmplan.runtime.text.prompt_templates import write_template

    directory.mkdir(parents=True, exist_ok=True)
    state.model.save_pretrained(str(directory))
    state.tokenizer.save_pretrained(str(directory))
    write_template(directory, state.data_stats.template, state.data_stats.format, ALPACA_PROMPT_NO_INPUT)


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss per step (raw and smoothed, as LLaMA-Factory's --plot_loss draws it) and eval loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(steps, losses, color="#1f77b4", alpha=0.4, label="train loss")
    axes.plot(steps, smooth(losses), color="#1f77b4", label="train loss (smoothed)")
    evals = [(h["step"], h["eval_loss"]) for h in history if h["eval_loss"] is not None]
    if evals:
        axes.plot(*zip(*evals), "o-", color="#d62728", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def smooth(values: list[float]) -> list[float]:
    """Exponential moving average with LLaMA-Factory's weight (stronger for longer curves)."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    smoothed, last = [], values[0]
    for value in values:
        last = last * weight + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def write_summary(state: TrainState, result: TrainResult) -> None:
    summary = {
        "steps": result.steps, "epochs": result.steps / state.schedule.steps_per_epoch,
        "final_loss": result.final_loss, "eval_loss": result.eval_loss, "tokens": state.tokens,
        "train_seconds": state.train_seconds, "tokens_per_s": result.tokens_per_s,
        "peak_memory_per_rank": list(result.peak_memory_per_rank),
        "peak_memory_kind": "cuda max_memory_reserved" if state.device.type == "cuda" else "process peak RSS",
        "adapter_dir": result.adapter_dir, "model_dir": result.model_dir, "resumed_from": result.resumed_from,
        "recipe": {"compile": "layers" if compiled_layers(state.model) else "none"},
        "data": state.data_stats.to_dict() if hasattr(state.data_stats, "to_dict") else None,
        "config": state.config.to_dict(),
    }
    Path(result.summary_path).write_text(json.dumps(summary, indent=2) + "\n")


# ---- cleanup --------------------------------------------------------------------------------------
def cleanup(state: TrainState) -> None:
    """Drop the model, optimizer and data and give the memory back (the CUDA cache too)."""
    state.engine = None  # type: ignore[assignment]
    state.scheduler = None
    if state.zero3_loading is not None:
        release_zero3_loading()
        state.zero3_loading = None
    gc.collect()
    if state.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


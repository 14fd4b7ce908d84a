"""Building and loading models the way llmplan's runtime runs them.

These are the runtime's defaults, and the GPU measurements in `benchmarks/` use exactly these
functions, so the estimator is calibrated against what the runtime really does:
- SDPA attention (eager where transformers has no SDPA path: `attention_implementation`);
- the CUDA caching allocator with expandable segments (set before torch initialises CUDA), which
  keeps reserved memory close to allocated memory when the KV cache grows step by step;
- bitsandbytes LLM.int8 (threshold 6.0) and NF4 with double quantization and bf16 compute;
- PEFT LoRA adapters kept in fp32 (PEFT's `autocast_adapter_dtype=True`), dropout 0, all linear
  layers of the decoder blocks unless targets are given;
- QLoRA keeps every non-quantized weight (embeddings, norms, head) in the compute dtype: unlike PEFT's
  `prepare_model_for_kbit_training`, nothing is upcast to fp32, so activations and attention stay 16-bit
  and SDPA takes a fused kernel (flash or memory-efficient) at any length. What stays fp32 for stability:
  the LoRA weights and their optimizer states, the RMSNorm's variance (transformers computes it in fp32),
  and the loss (HF upcasts the logits; Liger's fused loss accumulates in fp32);
- Liger Kernel (`prepare_for_training(kernels="liger")`, CUDA only): RMSNorm, RoPE, SwiGLU and the fused
  linear cross-entropy that never materialises the logits, for the architectures in `LIGER_MODEL_TYPES`;
- regional compilation (`prepare_for_training(compile_layers=True)`): each decoder layer through
  `torch.compile` (one graph reused by every layer), Liger keeping only its fused loss (Inductor fuses the
  norms, RoPE and SwiGLU itself); the recipe decides where it runs (`runtime.train.train.compile_that_runs`);
- torch AdamW with `fused=True`, states in the parameters' dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmplan.planner.defaults import ALL_LINEAR
from llmplan.planner.models import ModelSpec, attention_implementation
from llmplan.planner.request import LIGER_MODEL_TYPES, Kernels, liger_runs_on

from llmplan.runtime.models.architectures import hf_config_dict

if TYPE_CHECKING:  # pragma: no cover
    import torch

ALLOCATOR_CONF = "expandable_segments:True"


def configure_allocator(env: dict[str, str] | None = None) -> None:
    """Use expandable segments unless the user chose an allocator configuration of their own."""
    target = os.environ if env is None else env
    target.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_CONF)


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def build_random_model(spec: ModelSpec, dtype: str, device: str) -> Any:
    """A randomly initialised causal LM with `spec`'s architecture, built directly on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(spec.model_type, **hf_config_dict(spec))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch_dtype(dtype), attn_implementation=spec.attention
        )
    return model


def quantization_config(quant: str) -> Any:
    """bitsandbytes settings for `int8` or `nf4`; None for unquantized weights."""
    if quant == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    raise ValueError(f"unknown quantization {quant!r}: use none, int8 or nf4")


def load_pretrained(path: str, dtype: str, quant: str, device: str | None) -> Any:
    """Load a local Hugging Face directory with the runtime's attention and quantization settings.

    `device` "auto" shards the model over every GPU the process sees (HF `device_map="auto"`); None leaves
    placement to the loader (DeepSpeed ZeRO-3 partitions the weights as they load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = AutoConfig.from_pretrained(path).model_type
    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype(dtype),
        quantization_config=quantization_config(quant),
        attn_implementation=attention_implementation(model_type),
        device_map=None if device is None else "auto" if device == "auto" else {"": device},
    )


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ALL_LINEAR


def apply_lora(model: Any, lora: LoraSettings) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = lora.targets if isinstance(lora.targets, str) else list(lora.targets)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model: Any, activation_offload: bool = False) -> None:
    """Recompute each decoder layer in backward; with `activation_offload` the inputs each layer keeps for that
    recomputation wait in CPU memory instead of on the GPU (`checkpoint_offloading_inputs`)."""
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if activation_offload:
        for module in model.modules():
            if hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = checkpoint_offloading_inputs


def checkpoint_offloading_inputs(function: Any, *args: Any, **kwargs: Any) -> Any:
    """`torch.utils.checkpoint` (non-reentrant) of one layer whose saved inputs move to CPU memory (pinned on
    CUDA hosts) as the forward saves them and come back when backward recomputes the layer: what Unsloth's
    "unsloth" checkpointing mode and torch's `save_on_cpu` do. Only the checkpoint's own inputs are offloaded
    (the checkpoint's hooks handle what the layer computes inside); everything else stays on the GPU."""
    import torch
    from torch.utils.checkpoint import checkpoint

    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


KERNELS = tuple(kind.value for kind in Kernels)


def kernels_that_run(requested: str | None, model_type: str, device_type: str,
                     compute_capability: tuple[int, int] | None = None, liger_installed: bool = True) -> str:
    """The kernels a run really uses: Liger where asked (default: on CUDA) and supported (the architecture, and
    the card: Triton needs compute capability 7.0+), else none. By default a run without the `liger-kernel`
    package (the `gpu` extra) runs without it; asked for by name, its absence is an error that says what to do."""
    if requested not in (None, *KERNELS):
        raise ValueError(f"unknown kernels {requested!r}: use {' or '.join(KERNELS)}")
    wanted = requested or ("liger" if device_type == "cuda" else "none")
    if (wanted == "liger" and device_type == "cuda" and model_type in LIGER_MODEL_TYPES
            and liger_runs_on(compute_capability)):
        if liger_installed:
            return "liger"
        if requested == "liger":
            raise ValueError("--kernels liger needs the liger-kernel package on the GPU machine: "
                             "pip install 'llmplan[gpu]' (or pip install liger-kernel), or use --kernels none")
    return "none"


def liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def apply_liger_kernels(model: Any, layers: bool = True) -> None:
    """Swap in Liger's Triton kernels on this model instance (before PEFT wraps it); `layers` False keeps only
    the fused loss (for compiled decoder layers, where Inductor fuses the norms, RoPE and SwiGLU)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=layers, rms_norm=layers, swiglu=layers, geglu=layers,
                                    cross_entropy=False, fused_linear_cross_entropy=True)


def inference_kernels_that_run(model_type: str, device_type: str, quant: str,
                                compute_capability: tuple[int, int] | None, liger_installed: bool) -> str:
    """Liger's layer kernels (RMSNorm, RoPE, SwiGLU: fewer, fused kernels in every decode step) for generation on
    CUDA with 16/32-bit weights of a supported architecture when the package is there; quantized models keep
    bitsandbytes' layers as they are."""
    if quant != "none" or not liger_installed:
        return "none"
    return kernels_that_run(None, model_type, device_type, compute_capability)


def apply_liger_layer_kernels(model: Any) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU on this model instance, no loss (generation computes no loss)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, geglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)


def compile_decoder_layers(model: Any) -> None:
    """Regional compilation: each decoder layer through torch.compile (Inductor); the layers share one graph
    (their weights are its inputs), so the compile time is one layer's, whatever the depth."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.compile()


def compiled_layers(model: Any) -> bool:
    """Whether the model's decoder layers run compiled (`compile_decoder_layers`)."""
    return any(getattr(module, "_compiled_call_impl", None) is not None for module in model.modules())


def freeze_weights(model: Any) -> None:
    """A quantized base is frozen as loaded: no weight trains and none is upcast (see the module docstring)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def prepare_for_training(model: Any, method: str, gradient_checkpointing: bool, lora: LoraSettings | None,
                         kernels: str = "none", activation_offload: bool = False, compile_layers: bool = False) -> Any:
    """The model the recipe trains: kernels, frozen quantized base, checkpointing, adapters, compiled layers,
    train mode.

    `method` is full, lora or qlora; `lora` the adapters for lora and qlora; `activation_offload` (with
    checkpointing only) keeps the checkpointed layer inputs in CPU memory; `compile_layers` compiles each
    decoder layer, adapters included (with Liger, only its fused loss is kept)."""
    if activation_offload and not gradient_checkpointing:
        raise ValueError("activation offload moves the checkpointed layer inputs: it needs gradient checkpointing")
    model.config.use_cache = False  # no KV cache in training
    if kernels == "liger":
        apply_liger_kernels(model, layers=not compile_layers)
    if method == "qlora":
        freeze_weights(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, activation_offload)
    if method in ("lora", "qlora"):
        if lora is None:
            raise ValueError(f"method {method} needs LoRA settings")
        model = apply_lora(model, lora)
    if compile_layers:
        compile_decoder_layers(model)
    model.train()
    return model


def make_optimizer(model: Any, name: str, lr: float = 1e-4) -> Any:
    """AdamW over the trainable parameters: torch fused, or bitsandbytes 8-bit (optionally paged)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        import torch

        fused = all(p.is_cuda or p.device.type == "cpu" for p in params)
        return torch.optim.AdamW(params, lr=lr, fused=fused)
    import bitsandbytes as bnb

    if name == "adamw-8bit":
        return bnb.optim.AdamW8bit(params, lr=lr)
    if name == "paged-adamw-8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: use adamw, adamw-8bit or paged-adamw-8bit")

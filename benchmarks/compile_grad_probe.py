"""Does regional compilation train LoRA like eager? One step's loss and LoRA gradients, then a few AdamW steps.

    python benchmarks/compile_grad_probe.py --out compile-grad.jsonl                 # CUDA: Llama-3-8B width, bf16
    python benchmarks/compile_grad_probe.py --device cpu --tiny --out /tmp/x.jsonl   # CPU: tiny Llama, fp32

The model is the runtime's (`modeling.build_random_model` + `prepare_for_training`: LoRA r 16 on every linear
layer, adapters fp32, dropout 0), the Llama-3-8B shape with `--layers` decoder layers, random weights; every
variant starts from the same weights (one state dict loaded into each) and trains on the same batch, as
`long_context_bench.py --group speed` does (labels = inputs, AdamW lr 1e-4). Variants:
- eager: the reference (on CUDA: Liger's fused loss, SDPA's default kernel: flash);
- eager-efficient: the same with SDPA's memory-efficient kernel (CUDA) or the math kernel (CPU): the noise
  between two correct eager runs;
- compiled: `prepare_for_training(compile_layers=True)` (each decoder layer through Inductor);
- compiled-emulate (16-bit runs): the same with `torch._inductor.config.emulate_precision_casts`, which rounds to bf16
  between fused ops as eager does (Inductor otherwise keeps fp32 inside a fused kernel);
- eager-fp32 (16-bit runs): the whole model in fp32 from the same (bf16) weights: the exact arithmetic the others
  approximate.
For each variant against eager (and against eager-fp32 in 16-bit runs), per group of LoRA weights (lora_A / lora_B of
each projection): max |difference|, |difference| / |reference| (2-norms), and the fraction of elements whose
sign differs (Adam's first step is lr x sign(g)); whether every lora_A gradient is exactly zero (lora_B starts
at zero). `swallowed` measures, after one eager update, the share of adapted outputs where adding the adapter's
output to the bf16 base output and rounding back to bf16 (as PEFT does) leaves the base output unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import re
from pathlib import Path

import torch

STEPS = 5
LR = 1e-4


@dataclasses.dataclass(frozen=True)
class Setup:
    device: str
    dtype: str
    layers: int
    batch: int
    seq: int
    tiny: bool
    liger_loss: bool


def spec_for(setup: Setup):
    from llmplan.planner.model_catalog import MODELS

    spec = next(m for m in MODELS if m.name == "Llama-3-8B")
    if setup.tiny:
        return dataclasses.replace(spec, name="tiny-llama", num_layers=setup.layers, hidden_size=64,
                                   intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=256)
    return dataclasses.replace(spec, name=f"Llama-3-8B-{setup.layers}l", num_layers=setup.layers)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    dtype: str
    compiled: bool = False
    sdpa: str = "default"  # default | efficient | math
    emulate_casts: bool = False  # Inductor rounds to bf16 between fused ops, as eager does
    liger_layers: bool = False  # eager with Liger's RMSNorm, RoPE and SwiGLU too (the uncompiled recipe)


def build(setup: Setup, variant: Variant, state: dict | None):
    from llmplan.runtime.models.modeling import (
        LoraSettings,
        apply_liger_kernels,
        build_random_model,
        prepare_for_training,
    )

    torch.manual_seed(0)
    model = build_random_model(spec_for(setup), variant.dtype, setup.device)
    kernels = "liger" if setup.liger_loss else "none"
    if setup.liger_loss and not variant.compiled:
        apply_liger_kernels(model, layers=variant.liger_layers)  # Liger's loss in every variant
        kernels = "none"
    model = prepare_for_training(model, "lora", False, LoraSettings(16, 32, 0.0), kernels,
                                 compile_layers=variant.compiled)
    if state is not None:
        model.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in state.items()}, strict=True)
    return model


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "default":
        return contextlib.nullcontext()
    return sdpa_kernel([{"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]])


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().float().cpu().clone() for name, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def group_of(name: str) -> str:
    """lora_A.q_proj, lora_B.down_proj, ... (all layers together)."""
    kind = re.search(r"(lora_[AB])", name).group(1)
    projection = re.search(r"\.(\w+_proj)\.", name).group(1)
    return f"{kind}.{projection}"


def compare(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, dict]:
    groups: dict[str, list[str]] = {}
    for name in reference:
        groups.setdefault(group_of(name), []).append(name)
    rows = {}
    for group, names in sorted(groups.items()):
        a = torch.cat([grads[n].flatten() for n in names])
        b = torch.cat([reference[n].flatten() for n in names])
        diff = (a - b).abs()
        nonzero = b != 0
        rows[group] = {
            "max_abs_diff": float(diff.max()),
            "rel_diff": float(diff.norm() / b.norm()) if b.norm() > 0 else None,
            "max_abs_ref": float(b.abs().max()),
            "sign_differs": float((torch.sign(a) != torch.sign(b))[nonzero].float().mean()) if nonzero.any() else None,
        }
    return rows


def lora_a_zero(grads: dict[str, torch.Tensor]) -> dict:
    a = torch.cat([g.flatten() for n, g in grads.items() if "lora_A" in n])
    return {"all_exactly_zero": bool((a == 0).all()), "nonzero_fraction": float((a != 0).float().mean()),
            "max_abs": float(a.abs().max())}


def train(model, ids: torch.Tensor, backend: str) -> tuple[list[float], dict[str, torch.Tensor], float]:
    from llmplan.runtime.models.modeling import make_optimizer

    optimizer = make_optimizer(model, "adamw", LR)
    losses, first = [], {}
    swallowed = float("nan")
    with sdpa_backend(backend):
        for step in range(STEPS):
            if step == 1:
                swallowed = swallowed_share(model, ids)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if step == 0:
                first = lora_grads(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return losses, first, swallowed


@torch.no_grad()
def swallowed_share(model, ids: torch.Tensor) -> float:
    """Share of the adapted projections' outputs (first and last layer) where base + adapter, rounded to the
    base's dtype, equals the base output alone: the update PEFT's bf16 output loses."""
    from peft.tuners.lora import Linear as LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    watched = layers[:7] + layers[-7:]
    counts = [0, 0]

    def hook(module, inputs, _output):
        x = inputs[0]
        base = module.base_layer(x)
        if base.dtype == torch.float32:
            return
        adapter = module.lora_B["default"](module.lora_A["default"](x.to(module.lora_A["default"].weight.dtype)))
        summed = (base.float() + adapter * module.scaling["default"]).to(base.dtype)
        counts[0] += int((summed == base).sum())
        counts[1] += base.numel()

    handles = [m.register_forward_hook(hook) for m in watched]
    try:
        was_compiled = [getattr(m, "_compiled_call_impl", None) for m in model.modules()]
        if any(c is not None for c in was_compiled):
            return float("nan")  # hooks on compiled layers are not what eager runs; measured on eager only
        model(input_ids=ids[:1, :512])
    finally:
        for handle in handles:
            handle.remove()
    return counts[0] / counts[1] if counts[1] else float("nan")


def variants(setup: Setup) -> list[Variant]:
    dtype, cuda = setup.dtype, setup.device == "cuda"
    # The noise baseline: eager on SDPA's math kernel (the efficient kernel refuses GQA's enable_gqa on CUDA).
    found = [Variant("eager", dtype), Variant("eager-math", dtype, sdpa="math")]
    if cuda:
        found.append(Variant("eager-liger", dtype, liger_layers=True))
    found.append(Variant("compiled", dtype, True))
    if dtype != "fp32":
        found += [Variant("compiled-emulate", dtype, True, emulate_casts=True),
                  Variant("eager-fp32", "fp32")]
    return found


def run(setup: Setup) -> list[dict]:
    import torch._dynamo
    import torch._inductor.config as inductor_config

    state = {k: v.detach().clone() for k, v in build(setup, Variant("init", setup.dtype), None).state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    vocab = spec_for(setup).vocab_size
    ids = torch.randint(0, vocab, (setup.batch, setup.seq), generator=generator).to(setup.device)
    results = {}
    for variant in variants(setup):
        torch._dynamo.reset()
        inductor_config.emulate_precision_casts = variant.emulate_casts
        model = build(setup, variant, state)
        losses, grads, swallowed = train(model, ids, variant.sdpa)
        results[variant.name] = {"losses": losses, "grads": grads, "swallowed": swallowed}
        print(f"{variant.name}: losses {[round(x, 5) for x in losses]}", flush=True)
        del model
        if setup.device == "cuda":
            torch.cuda.empty_cache()
    inductor_config.emulate_precision_casts = False
    return [record(setup, name, results) for name in results]


def record(setup: Setup, name: str, results: dict) -> dict:
    mine = results[name]
    row = {"probe": "compile-grad", "setup": dataclasses.asdict(setup), "variant": name, "losses": mine["losses"],
           "lora_a_first_grad": lora_a_zero(mine["grads"]), "swallowed_after_one_update": mine["swallowed"],
           "vs_eager": compare(mine["grads"], results["eager"]["grads"]), **environment(setup)}
    if "eager-fp32" in results:
        row["vs_eager_fp32"] = compare(mine["grads"], results["eager-fp32"]["grads"])
    return row


def environment(setup: Setup) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "peft", "liger-kernel", "triton"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    gpu = torch.cuda.get_device_name(0) if setup.device == "cuda" else "cpu"
    return {"gpu": gpu, "versions": versions, "cuda": torch.version.cuda, "date": dt.date.today().isoformat()}


def summary(rows: list[dict]) -> None:
    for row in rows:
        worst = {k: max((g[k] or 0) for g in row["vs_eager"].values()) for k in ("rel_diff", "sign_differs")}
        fp32 = row.get("vs_eager_fp32")
        vs32 = f", vs fp32 rel {max((g['rel_diff'] or 0) for g in fp32.values()):.3g}" if fp32 else ""
        print(f"{row['variant']:18s} loss after 1 update {row['losses'][1]:.5f}, last {row['losses'][-1]:.5f}; "
              f"vs eager: worst rel {worst['rel_diff']:.3g}, sign differs {worst['sign_differs']:.3g}{vs32}; "
              f"lora_A grads all zero: {row['lora_a_first_grad']['all_exactly_zero']}; "
              f"swallowed {row['swallowed_after_one_update']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="a 64-wide Llama (CPU check of the probe itself)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    setup = Setup(args.device, dtype, args.layers, args.batch, args.seq, args.tiny, liger_loss=cuda)
    rows = run(setup)
    with args.out.open("a") as sink:
        for row in rows:
            sink.write(json.dumps(row) + "\n")
    summary(rows)


if __name__ == "__main__":
    main()

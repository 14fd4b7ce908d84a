"""Which SDPA kernel runs fp32 grouped-query attention (QLoRA's activations), and what it saves.

    python benchmarks/sdpa_fp32_probe.py > sdpa_fp32.json

For each (heads, kv_heads, batch, seq) of the measured QLoRA runs: memory kept alive after the forward
(what backward will need) and whether the memory-efficient kernel accepts the call on its own.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [  # (model, heads, kv_heads, head_dim, batch, seq)
    ("Llama-3.2-3B", 24, 8, 128, 4, 512),
    ("Qwen2.5-1.5B", 12, 2, 128, 4, 1024),
    ("Qwen2.5-3B", 16, 2, 128, 2, 2048),
]


def saved_bytes(heads, kv, dim, batch, seq, dtype, backend=None):
    q = torch.randn(batch, heads, seq, dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv, seq, dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv, seq, dim, device="cuda", dtype=dtype, requires_grad=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        if backend is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    except RuntimeError as error:
        return {"error": str(error).splitlines()[0][:200]}
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    return {"kept_bytes": kept, "peak_bytes": peak, "grad_fn": type(out.grad_fn).__name__,
            "elements_bhss": batch * heads * seq * seq}


results = []
for name, heads, kv, dim, batch, seq in SHAPES:
    for dtype in (torch.float32, torch.bfloat16):
        row = {"model": name, "dtype": str(dtype), "default": saved_bytes(heads, kv, dim, batch, seq, dtype)}
        row["efficient_only"] = saved_bytes(heads, kv, dim, batch, seq, dtype, SDPBackend.EFFICIENT_ATTENTION)
        results.append(row)
print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": results}, indent=1))

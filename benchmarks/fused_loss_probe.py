"""Which fused loss keeps less memory: Liger's fused linear cross-entropy or Apple's cut-cross-entropy (issue 15).

    python benchmarks/fused_loss_probe.py > fused-loss.jsonl

For each shape (tokens x hidden -> vocab, bf16, the head frozen as in LoRA/QLoRA and trainable as in full
fine-tuning) it runs the loss forward and backward once to warm up, then once measured: the peak memory
allocated above what the inputs hold, and the time. "hf" is what transformers does without either: the bf16
logits, upcast to fp32, then cross_entropy. One JSON line per (shape, implementation).
"""

from __future__ import annotations

import json
import time

SHAPES = ((8192, 4096, 128256), (32768, 4096, 128256), (16384, 3072, 256000), (16384, 4096, 32768))


def hf_loss(hidden, weight, labels):
    import torch

    logits = (hidden @ weight.t()).float()
    return torch.nn.functional.cross_entropy(logits, labels)


def liger_loss(hidden, weight, labels):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss()(weight, hidden, labels)


def cce_loss(hidden, weight, labels):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, labels)


LOSSES = {"hf": hf_loss, "liger": liger_loss, "cce": cce_loss}


def measure(name: str, tokens: int, hidden_size: int, vocab: int, head_trains: bool) -> dict:
    import torch

    torch.manual_seed(0)
    hidden = (torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_(head_trains)
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    record = {"loss": name, "tokens": tokens, "hidden": hidden_size, "vocab": vocab, "head_trains": head_trains}
    try:
        for attempt in range(2):
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            loss = LOSSES[name](hidden, weight, labels)
            loss.backward()
            torch.cuda.synchronize()
            record.update(loss_value=float(loss), seconds=time.perf_counter() - started,
                          peak_above_inputs_bytes=torch.cuda.max_memory_allocated() - base)
            del loss
    except Exception as error:  # noqa: BLE001 - a failing implementation is a result here
        record["error"] = repr(error)[-500:]
    return record


def main() -> None:
    import datetime as dt
    from importlib.metadata import version

    import torch

    env = {"gpu": torch.cuda.get_device_name(0), "date": dt.date.today().isoformat(), "torch": torch.__version__,
           "liger-kernel": version("liger-kernel"), "cut-cross-entropy": version("cut-cross-entropy")}
    for tokens, hidden_size, vocab in SHAPES:
        for head_trains in (False, True):
            for name in LOSSES:
                print(json.dumps({**measure(name, tokens, hidden_size, vocab, head_trains), **env}), flush=True)


if __name__ == "__main__":
    main()

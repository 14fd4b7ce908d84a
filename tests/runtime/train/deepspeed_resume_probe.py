"""Run as a script by test_checkpoint_safety: one gloo process writes a real DeepSpeed checkpoint (ZeRO 2, bf16),
reads it back through DeepSpeedEngine.load, then plants a pickle payload in it and tries again."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import torch
import torch.distributed as dist


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def engine(directory_port: int):
    from llmplan.runtime.train.distributed import DeepSpeedEngine, import_deepspeed

    deepspeed = import_deepspeed("cpu")  # as the recipe does on the CPU: no C++ build of DeepSpeed's shm all-reduce

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
              "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    module, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=config)
    return DeepSpeedEngine(module=module, model=model, world_size=1, zero=2)


def main(workdir: Path, port: int) -> None:
    from llmplan.runtime.train.distributed import UnsafeCheckpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    ds = engine(port)
    ds.backward(ds.module(torch.randn(1, 8).bfloat16()).sum())
    ds.step()
    checkpoint = workdir / "step-1"
    ds.save(checkpoint, rank=0)
    ds.load(checkpoint)  # what DeepSpeed wrote reads back
    files = sorted(p.name for p in (checkpoint / "deepspeed").glob("*.pt"))
    optimizer_file = next(checkpoint.glob("deepspeed/*optim_states.pt"))
    marker = workdir / "ran"
    refused = []
    for plant in (lambda: torch.save({"payload": Payload(str(marker))}, optimizer_file),  # torch.save's zip format
                  lambda: optimizer_file.write_bytes(pickle.dumps({"payload": Payload(str(marker))}, protocol=2))):
        plant()
        try:
            ds.load(checkpoint)
            refused.append("")
        except UnsafeCheckpoint as error:
            refused.append(str(error))
    print(json.dumps({"files": files, "refused": refused, "ran": marker.exists()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))

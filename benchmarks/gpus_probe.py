"""Record what `llmplan gpus --json` sees on a real GPU machine, to check the probe and the catalog.

    python benchmarks/gpus_probe.py benchmarks/results/gpus_probe_h200.json

Runs the NVML probe in-process (no CLI) and writes one JSON document: the date, the nvidia-ml-py
version, the host, the probe's output, and for every GPU whether its name matched a catalog entry
and whether the memory total NVML reports equals the catalog's `nvml_memory_mib`.
Exit status: 0 when NVML answered (GPUs found or not), 1 when the output path cannot be written.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from llmplan.planner.gpus import ProbedGpu
from llmplan.planner.nvml_probe import probe_gpus
from llmplan.planner.units import MiB


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def catalog_check(gpu: ProbedGpu) -> dict[str, Any]:
    """How the probed device compares with the catalog entry its NVML name matched."""
    reported_mib = gpu.memory_total_bytes / MiB
    check: dict[str, Any] = {
        "index": gpu.index,
        "nvml_name": gpu.name,
        "catalog_name": gpu.catalog.name if gpu.catalog else None,
        "reported_total_mib": reported_mib,
        "catalog_nvml_memory_mib": gpu.catalog.nvml_memory_mib if gpu.catalog else None,
    }
    if gpu.catalog is not None:
        check["memory_matches_catalog"] = reported_mib == gpu.catalog.nvml_memory_mib
        check["compute_capability_matches_catalog"] = gpu.compute_capability == gpu.catalog.compute_capability
    return check


def record() -> dict[str, Any]:
    probe = probe_gpus()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "pynvml_version": _version("nvidia-ml-py"),
        "llmplan_version": _version("llmplan"),
        "probe": probe.to_dict(),
        "catalog_check": [catalog_check(gpu) for gpu in probe.gpus],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="where to write the JSON record")
    args = parser.parse_args(argv)
    data = record()
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as error:
        print(f"cannot write {args.output}: {error}", file=sys.stderr)
        return 1
    probe = data["probe"]
    if probe["gpus"]:
        names = ", ".join(f"{gpu['index']}: {gpu['name']}" for gpu in probe["gpus"])
        print(f"{len(probe['gpus'])} GPU(s) ({names}); driver {probe['driver_version']}, CUDA {probe['cuda_version']}")
        for check in data["catalog_check"]:
            print(f"  GPU {check['index']}: catalog {check['catalog_name']}, "
                  f"memory matches catalog: {check.get('memory_matches_catalog')}")
    else:
        print(f"no GPU: {probe['reason']}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

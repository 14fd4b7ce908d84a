"""`llmplan gpus` through click's CliRunner, with a fake pynvml module passed in the context object."""

from __future__ import annotations

import json
import types
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import llmplan.cli.gpus as gpus_module
from llmplan.cli.gpus import gpus
from llmplan.cli.main import cli
from llmplan.planner.units import GiB, MiB


class NVMLError(Exception):
    def __str__(self) -> str:
        return type(self).__name__.removeprefix("NVMLError_")


class NVMLError_LibraryNotFound(NVMLError): ...  # noqa: N801 (pynvml's names)


class NVMLError_NotSupported(NVMLError): ...  # noqa: N801


class NVMLError_NotFound(NVMLError): ...  # noqa: N801


def fake_pynvml(devices: list[dict], *, init_error: type[NVMLError] | None = None) -> types.ModuleType:
    """A module with the pynvml functions `llmplan gpus` calls, answering from ``devices``.

    Each device: name, bus (PCI bus id), total_mib, used_mib, cc, links ({link: remote bus id}; None for
    a card without NVLink), procs ([(pid, name or None, used bytes)]).
    """
    module = types.ModuleType("pynvml")

    def init() -> None:
        if init_error is not None:
            raise init_error()

    def nvlink_state(device: dict, link: int) -> int:
        if device["links"] is None:
            raise NVMLError_NotSupported()
        return int(link in device["links"])

    def memory(device: dict) -> SimpleNamespace:
        total, used = device["total_mib"] * MiB, device["used_mib"] * MiB
        return SimpleNamespace(total=total, used=used, free=total - used)

    names = {pid: name for device in devices for pid, name, _ in device["procs"] if name}

    def process_name(pid: int) -> str:
        if pid not in names:
            raise NVMLError_NotFound()
        return names[pid]

    module.__dict__.update(
        NVMLError=NVMLError,
        NVMLError_LibraryNotFound=NVMLError_LibraryNotFound,
        NVMLError_NotSupported=NVMLError_NotSupported,
        NVML_NVLINK_MAX_LINKS=18,
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: "560.35.03",
        nvmlSystemGetCudaDriverVersion=lambda: 12060,
        nvmlSystemGetProcessName=process_name,
        nvmlDeviceGetCount=lambda: len(devices),
        nvmlDeviceGetHandleByIndex=lambda index: devices[index],
        nvmlDeviceGetName=lambda device: device["name"],
        nvmlDeviceGetUUID=lambda device: f"GPU-{device['bus']}",
        nvmlDeviceGetMemoryInfo=memory,
        nvmlDeviceGetCudaComputeCapability=lambda device: device["cc"],
        nvmlDeviceGetPciInfo=lambda device: SimpleNamespace(busId=device["bus"].encode()),
        nvmlDeviceGetNvLinkState=nvlink_state,
        nvmlDeviceGetNvLinkRemotePciInfo=lambda device, link: SimpleNamespace(busId=device["links"][link].encode()),
        nvmlDeviceGetComputeRunningProcesses=lambda device: [
            SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, _, used in device["procs"]
        ],
        nvmlDeviceGetGraphicsRunningProcesses=lambda device: [],
    )
    return module


def h200(bus: str, peer: str, procs: list | None = None) -> dict:
    return {"name": "NVIDIA H200", "bus": bus, "total_mib": 143771, "used_mib": 4500, "cc": (9, 0),
            "links": {link: peer for link in range(18)}, "procs": procs or []}


TWO_H200 = [
    h200("00000000:18:00.0", "00000000:2A:00.0", procs=[(4242, "python3", 4 * GiB), (99, None, None)]),
    h200("00000000:2A:00.0", "00000000:18:00.0"),
]
NO_DRIVER = fake_pynvml([], init_error=NVMLError_LibraryNotFound)


def invoke(args: list[str], nvml: types.ModuleType, *, through_group: bool = False, columns: int = 200):
    runner = CliRunner(env={"COLUMNS": str(columns)})  # rich reads the width from COLUMNS
    if through_group:
        return runner.invoke(cli, ["gpus", *args], obj={"nvml": nvml})
    return runner.invoke(gpus, args, obj={"nvml": nvml})


@pytest.mark.parametrize("through_group", [False, True])
def test_json_lists_devices_peers_and_processes(through_group: bool) -> None:
    result = invoke(["--json"], fake_pynvml(TWO_H200), through_group=through_group)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [gpu["name"] for gpu in data["gpus"]] == ["NVIDIA H200", "NVIDIA H200"]
    first = data["gpus"][0]
    assert first["memory_total_bytes"] == 143771 * MiB
    assert first["memory_free_bytes"] == (143771 - 4500) * MiB
    assert first["compute_capability"] == "9.0" and first["bf16"] is True
    assert first["uuid"] == "GPU-00000000:18:00.0"
    assert first["nvlink_peers"] == [1] and data["gpus"][1]["nvlink_peers"] == [0]
    assert first["catalog_name"] == "H200"
    assert first["processes"] == [
        {"pid": 99, "name": None, "used_memory_bytes": None, "kind": "compute"},
        {"pid": 4242, "name": "python3", "used_memory_bytes": 4 * GiB, "kind": "compute"},
    ]
    assert (data["driver_version"], data["cuda_version"], data["reason"]) == ("560.35.03", "12.6", None)


def test_tables_show_devices_and_processes() -> None:
    result = invoke([], fake_pynvml(TWO_H200))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "2 GPUs (driver 560.35.03, CUDA 12.6)" in out
    for text in ("NVIDIA H200", "GPU-00000000:18:00.0", "4.4 / 140.4 GiB", "136.0 GiB free", "9.0", "4242",
                 "python3", "4.00 GiB"):
        assert text in out, text


def test_narrow_terminal_folds_rather_than_truncates() -> None:
    result = invoke([], fake_pynvml(TWO_H200), columns=80)
    assert result.exit_code == 0 and "…" not in result.output


def test_pcie_card_without_nvlink_or_processes() -> None:
    card = {"name": "NVIDIA GeForce RTX 4090", "bus": "00000000:01:00.0", "total_mib": 24564, "used_mib": 300,
            "cc": (8, 9), "links": None, "procs": []}
    result = invoke(["--json"], fake_pynvml([card]))
    assert result.exit_code == 0, result.output
    gpu = json.loads(result.output)["gpus"][0]
    assert gpu["nvlink_peers"] == [] and gpu["processes"] == [] and gpu["notes"] == []
    assert gpu["catalog_name"] == "RTX 4090"
    table = invoke([], fake_pynvml([card]))
    assert table.exit_code == 0 and "Processes" not in table.output


def test_no_driver_says_so_and_exits_zero() -> None:
    result = invoke([], NO_DRIVER)
    assert result.exit_code == 0
    assert result.exception is None
    out = " ".join(result.output.split())  # rich wraps at the terminal width
    assert "No NVIDIA driver found" in out
    assert "No GPU found: planning for 1 x RTX 4090 (24 GB); use --gpu NAME or --gpu-mem SIZE." in out
    assert "Traceback" not in result.output


def test_no_driver_json() -> None:
    result = invoke(["--json"], NO_DRIVER)
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["gpus"] == [] and "no NVIDIA driver found" in data["reason"]
    assert data["planning_default"] == "RTX 4090"


def test_zero_devices_says_so() -> None:
    result = invoke([], fake_pynvml([]))
    assert result.exit_code == 0
    assert "reports no GPU" in result.output


def test_resolver_can_be_monkeypatched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus_module, "resolve_nvml", lambda ctx: fake_pynvml(TWO_H200))
    result = CliRunner().invoke(gpus, ["--json"])
    assert result.exit_code == 0 and len(json.loads(result.output)["gpus"]) == 2


def test_without_injection_the_real_probe_runs_and_exits_zero() -> None:
    result = CliRunner().invoke(gpus, ["--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["gpus"] or data["reason"]


def test_catalog_lists_known_cards() -> None:
    result = CliRunner(env={"COLUMNS": "160"}).invoke(gpus, ["--catalog"])
    assert result.exit_code == 0, result.output
    for name in ("P40", "A100 80GB", "H200", "B200", "RTX 5090"):
        assert name in result.output
    data = json.loads(CliRunner().invoke(gpus, ["--catalog", "--json"]).output)
    assert {"name": "H200", "nvml_memory_mib": 143771}.items() <= next(
        spec for spec in data if spec["name"] == "H200").items()


def test_help_is_listed_by_the_group() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and "gpus" in result.output

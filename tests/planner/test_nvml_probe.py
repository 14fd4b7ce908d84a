"""The NVML probe (planner/nvml_probe.py) against a fake pynvml at that one boundary.

`FakeNvml` has the functions, constants and exception classes of nvidia-ml-py that the probe uses
(`test_fake_matches_the_real_pynvml_interface` keeps it honest) and answers from `FakeDevice` data.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from llmplan.planner.gpus import GpuProbe
from llmplan.planner.nvml_probe import probe_gpus
from llmplan.planner.units import GiB, MiB


# ---- the fake -----------------------------------------------------------------------------------
class NVMLError(Exception):
    """pynvml.NVMLError: one subclass per NVML return code, named NVMLError_<Code>."""

    def __str__(self) -> str:
        return type(self).__name__.removeprefix("NVMLError_")


class NVMLError_LibraryNotFound(NVMLError): ...  # noqa: N801 (pynvml's names)


class NVMLError_DriverNotLoaded(NVMLError): ...  # noqa: N801


class NVMLError_NotSupported(NVMLError): ...  # noqa: N801


class NVMLError_InvalidArgument(NVMLError): ...  # noqa: N801


class NVMLError_NoPermission(NVMLError): ...  # noqa: N801


class NVMLError_NotFound(NVMLError): ...  # noqa: N801


class NVMLError_GpuIsLost(NVMLError): ...  # noqa: N801


class NVMLError_FunctionNotFound(NVMLError): ...  # noqa: N801


SWITCH = "switch"  # an NVLink whose far end is an NVSwitch


@dataclass
class FakeDevice:
    name: str
    bus_id: str  # as nvmlDeviceGetPciInfo reports it, e.g. "00000000:18:00.0"
    total_mib: int
    used_mib: int = 0
    capability: tuple[int, int] = (9, 0)
    uuid: str = ""
    nvlinks: dict[int, str] | None = None  # link -> remote bus id or SWITCH; None: no NVLink at all
    max_links: int = 18
    compute: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    failing: dict[str, type[NVMLError]] = field(default_factory=dict)  # function name -> error
    lost: bool = False


class FakeNvml:
    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NoPermission = NVMLError_NoPermission
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVML_NVLINK_MAX_LINKS = 36
    NVML_NVLINK_DEVICE_TYPE_GPU = 0
    NVML_NVLINK_DEVICE_TYPE_SWITCH = 2

    def __init__(self, devices: list[FakeDevice] = (), *, init_error: type[NVMLError] | None = None,
                 process_names: dict[int, str] | None = None, cuda: int = 12040) -> None:
        self.devices = list(devices)
        self.init_error = init_error
        self.process_names = process_names or {}
        self.cuda = cuda
        self.open = 0  # nvmlInit calls not yet shut down

    # -- library
    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.init_error()
        self.open += 1

    def nvmlShutdown(self) -> None:
        self.open -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        if pid not in self.process_names:
            raise NVMLError_NotFound()
        return self.process_names[pid]

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        if self.devices[index].lost:
            raise NVMLError_GpuIsLost()
        return self.devices[index]

    # -- one device
    @staticmethod
    def _check(device: FakeDevice, function: str) -> None:
        if function in device.failing:
            raise device.failing[function]()

    def nvmlDeviceGetName(self, device: FakeDevice) -> str:
        self._check(device, "nvmlDeviceGetName")
        return device.name

    def nvmlDeviceGetUUID(self, device: FakeDevice) -> str:
        self._check(device, "nvmlDeviceGetUUID")
        return device.uuid or f"GPU-{device.bus_id}"

    def nvmlDeviceGetMemoryInfo(self, device: FakeDevice) -> SimpleNamespace:
        self._check(device, "nvmlDeviceGetMemoryInfo")
        total, used = device.total_mib * MiB, device.used_mib * MiB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetCudaComputeCapability(self, device: FakeDevice) -> tuple[int, int]:
        self._check(device, "nvmlDeviceGetCudaComputeCapability")
        return device.capability

    def nvmlDeviceGetPciInfo(self, device: FakeDevice) -> SimpleNamespace:
        self._check(device, "nvmlDeviceGetPciInfo")
        return SimpleNamespace(busId=device.bus_id.encode(), busIdLegacy=b"")

    def nvmlDeviceGetNvLinkState(self, device: FakeDevice, link: int) -> int:
        self._check(device, "nvmlDeviceGetNvLinkState")
        if device.nvlinks is None:
            raise NVMLError_NotSupported()
        if link >= device.max_links:
            raise NVMLError_InvalidArgument()
        return 1 if link in device.nvlinks else 0

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, device: FakeDevice, link: int) -> int:
        self._check(device, "nvmlDeviceGetNvLinkRemoteDeviceType")
        return self.NVML_NVLINK_DEVICE_TYPE_SWITCH if device.nvlinks[link] == SWITCH else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, device: FakeDevice, link: int) -> SimpleNamespace:
        self._check(device, "nvmlDeviceGetNvLinkRemotePciInfo")
        return SimpleNamespace(busId=device.nvlinks[link].encode())

    def nvmlDeviceGetComputeRunningProcesses(self, device: FakeDevice) -> list[SimpleNamespace]:
        self._check(device, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in device.compute]

    def nvmlDeviceGetGraphicsRunningProcesses(self, device: FakeDevice) -> list[SimpleNamespace]:
        self._check(device, "nvmlDeviceGetGraphicsRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in device.graphics]


FAKE_INTERFACE = [name for name in vars(FakeNvml) if name.startswith(("nvml", "NVML"))]


def h100(bus_id: str, **kwargs: Any) -> FakeDevice:
    return FakeDevice(name="NVIDIA H100 80GB HBM3", bus_id=bus_id, total_mib=81559, **kwargs)


def probe(nvml: FakeNvml, **environ: str) -> GpuProbe:
    result = probe_gpus(nvml, environ=environ)
    assert nvml.open == 0, "every successful nvmlInit is shut down"
    return result


# ---- the fake is faithful -------------------------------------------------------------------------
def test_fake_matches_the_real_pynvml_interface() -> None:
    pynvml = pytest.importorskip("pynvml")  # importing it does not load the NVML library
    missing = [name for name in FAKE_INTERFACE if not hasattr(pynvml, name)]
    assert not missing
    assert issubclass(pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError)
    assert pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH == FakeNvml.NVML_NVLINK_DEVICE_TYPE_SWITCH


# ---- devices --------------------------------------------------------------------------------------
def test_lists_devices_with_memory_capability_versions_and_catalog_match() -> None:
    nvml = FakeNvml([
        h100("00000000:18:00.0", used_mib=1024, uuid="GPU-aaaa"),
        FakeDevice(name="Tesla P40", bus_id="00000000:3B:00.0", total_mib=24576, capability=(6, 1)),
    ])
    result = probe(nvml)
    assert result.found and not result.reason
    assert (result.driver_version, result.cuda_version) == ("550.54.15", "12.4")
    first, second = result.gpus
    assert (first.index, first.name, first.uuid) == (0, "NVIDIA H100 80GB HBM3", "GPU-aaaa")
    assert first.memory_total_bytes == 81559 * MiB
    assert first.memory_used_bytes == 1024 * MiB
    assert first.memory_free_bytes == (81559 - 1024) * MiB
    assert first.compute_capability == (9, 0) and first.bf16
    assert first.pci_bus_id == "00000000:18:00.0"
    assert first.catalog is not None and first.catalog.name == "H100 SXM"
    assert (first.driver_version, first.cuda_version) == ("550.54.15", "12.4")
    assert second.catalog.name == "P40" and not second.bf16
    assert second.nvlink_peers == () and not second.nvswitch


def test_cuda_version_encoding() -> None:
    assert probe(FakeNvml([h100("0:1:0.0")], cuda=13000)).cuda_version == "13.0"
    assert probe(FakeNvml([h100("0:1:0.0")], cuda=12080)).cuda_version == "12.8"


def test_planning_spec_uses_catalog_throughput_and_probed_memory() -> None:
    gpu = probe(FakeNvml([FakeDevice(name="NVIDIA H200", bus_id="0:1:0.0", total_mib=143771)])).gpus[0]
    spec = gpu.planning_spec()
    assert spec.name == "H200" and spec.memory_bytes == 143771 * MiB and spec.memory_basis == "probed"
    assert spec.bf16_tflops == pytest.approx(989.4)


def test_unknown_card_has_no_catalog_entry() -> None:
    gpu = probe(FakeNvml([FakeDevice(name="NVIDIA A100 80GB PCIe", bus_id="0:1:0.0", total_mib=81920,
                                     capability=(8, 0))])).gpus[0]
    assert gpu.catalog is None
    spec = gpu.planning_spec()
    assert spec.memory_bytes == 80 * GiB and spec.fp16_tflops is None and spec.bf16


# ---- NVLink ---------------------------------------------------------------------------------------
def test_direct_nvlinks_are_matched_by_pci_bus_id() -> None:
    # GPU 0 <-> GPU 1 over four links, GPU 2 <-> GPU 3 over two; remote ids in the short form.
    nvml = FakeNvml([
        h100("00000000:18:00.0", nvlinks={link: "0000:2A:00.0" for link in range(4)}),
        h100("00000000:2A:00.0", nvlinks={link: "0000:18:00.0" for link in range(4)}),
        h100("00000000:3B:00.0", nvlinks={0: "00000000:4c:00.0", 1: "00000000:4c:00.0"}),
        h100("00000000:4C:00.0", nvlinks={0: "00000000:3b:00.0", 1: "00000000:3b:00.0"}),
    ])
    peers = [gpu.nvlink_peers for gpu in probe(nvml).gpus]
    assert peers == [(1,), (0,), (3,), (2,)]


def test_nvswitch_links_make_every_switched_gpu_a_peer() -> None:
    nvml = FakeNvml([h100(f"00000000:{bus}:00.0", nvlinks={link: SWITCH for link in range(18)})
                     for bus in ("18", "2A", "3B", "4C")])
    gpus = probe(nvml).gpus
    assert [gpu.nvlink_peers for gpu in gpus] == [(1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2)]
    assert all(gpu.nvswitch for gpu in gpus)


def test_a_link_counts_for_both_ends_when_one_side_cannot_tell() -> None:
    nvml = FakeNvml([
        h100("00000000:18:00.0", nvlinks={0: "00000000:2A:00.0"}),
        h100("00000000:2A:00.0", nvlinks={0: "00000000:18:00.0"},
             failing={"nvmlDeviceGetNvLinkRemotePciInfo": NVMLError_NotSupported}),
    ])
    assert [gpu.nvlink_peers for gpu in probe(nvml).gpus] == [(1,), (0,)]


def test_links_to_something_else_are_not_peers() -> None:
    nvml = FakeNvml([h100("00000000:18:00.0", nvlinks={0: "00000000:99:00.0"}),
                     h100("00000000:2A:00.0")])
    assert [gpu.nvlink_peers for gpu in probe(nvml).gpus] == [(), ()]


def test_cards_without_nvlink_tolerate_not_supported_quietly() -> None:
    nvml = FakeNvml([FakeDevice(name="NVIDIA GeForce RTX 4090", bus_id=f"00000000:0{bus}:00.0", total_mib=24564,
                                capability=(8, 9)) for bus in (1, 2)])
    gpus = probe(nvml).gpus
    assert [gpu.nvlink_peers for gpu in gpus] == [(), ()]
    assert all(not gpu.notes for gpu in gpus)


def test_nvlink_remote_type_not_supported_falls_back_to_bus_ids() -> None:
    nvml = FakeNvml([
        h100("00000000:18:00.0", nvlinks={0: "00000000:2A:00.0"},
             failing={"nvmlDeviceGetNvLinkRemoteDeviceType": NVMLError_NotSupported}),
        h100("00000000:2A:00.0", nvlinks={0: "00000000:18:00.0"},
             failing={"nvmlDeviceGetNvLinkRemoteDeviceType": NVMLError_NotSupported}),
    ])
    assert [gpu.nvlink_peers for gpu in probe(nvml).gpus] == [(1,), (0,)]


# ---- processes ------------------------------------------------------------------------------------
def test_processes_with_names_and_memory() -> None:
    nvml = FakeNvml(
        [h100("0:1:0.0", compute=[(4242, 30 * GiB), (77, None)], graphics=[(4242, 30 * GiB), (900, 64 * MiB)])],
        process_names={4242: "/usr/bin/python3", 900: "Xorg"},
    )
    processes = probe(nvml).gpus[0].processes
    assert [(p.pid, p.name, p.used_memory_bytes, p.kind) for p in processes] == [
        (77, None, None, "compute"),  # name unknown (another container), memory not accounted
        (900, "Xorg", 64 * MiB, "graphics"),
        (4242, "/usr/bin/python3", 30 * GiB, "compute+graphics"),
    ]


def test_process_queries_not_supported_become_notes() -> None:
    nvml = FakeNvml([h100("0:1:0.0", failing={
        "nvmlDeviceGetComputeRunningProcesses": NVMLError_NotSupported,
        "nvmlDeviceGetGraphicsRunningProcesses": NVMLError_NoPermission,
    })])
    gpu = probe(nvml).gpus[0]
    assert gpu.processes == ()
    assert gpu.notes == ("compute processes: NotSupported", "graphics processes: NoPermission")


def test_old_drivers_fall_back_to_the_v2_process_query() -> None:
    class OldDriver(FakeNvml):
        def nvmlDeviceGetComputeRunningProcesses(self, device: FakeDevice) -> list[SimpleNamespace]:
            raise NVMLError_FunctionNotFound()  # pynvml calls the _v3 symbol, which R470 lacks

        def nvmlDeviceGetComputeRunningProcesses_v2(self, device: FakeDevice) -> list[SimpleNamespace]:
            return super().nvmlDeviceGetComputeRunningProcesses(device)

    gpu = probe(OldDriver([h100("0:1:0.0", compute=[(7, GiB)])], process_names={7: "python"})).gpus[0]
    assert [(p.pid, p.name) for p in gpu.processes] == [(7, "python")] and gpu.notes == ()


# ---- partial failures -----------------------------------------------------------------------------
def test_unreadable_fields_become_notes_not_errors() -> None:
    nvml = FakeNvml([h100("0:1:0.0", failing={"nvmlDeviceGetMemoryInfo": NVMLError_NotSupported,
                                              "nvmlDeviceGetUUID": NVMLError_NoPermission})])
    gpu = probe(nvml).gpus[0]
    assert gpu.memory_total_bytes == 0 and gpu.uuid == ""
    assert "memory: NotSupported" in gpu.notes and "UUID: NoPermission" in gpu.notes
    assert gpu.planning_spec().memory_bytes == 81559 * MiB  # the catalog's figure stands in


def test_a_lost_gpu_is_skipped_with_a_note() -> None:
    nvml = FakeNvml([h100("0:1:0.0", lost=True), h100("0:2:0.0")])
    result = probe(nvml)
    assert [gpu.index for gpu in result.gpus] == [1]
    assert result.notes == ("GPU 0 skipped: GpuIsLost",)


def test_every_gpu_lost_gives_a_reason() -> None:
    result = probe(FakeNvml([h100("0:1:0.0", lost=True)]))
    assert not result.found and "none could be opened" in result.reason


# ---- no GPU ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("error", "words"),
    [
        (NVMLError_LibraryNotFound, "no NVIDIA driver found"),
        (NVMLError_DriverNotLoaded, "not loaded"),
        (NVMLError_NoPermission, "no permission"),
        (NVMLError_GpuIsLost, "could not start (GpuIsLost)"),
    ],
)
def test_nvml_that_cannot_start_gives_a_sentence(error: type[NVMLError], words: str) -> None:
    nvml = FakeNvml(init_error=error)
    result = probe(nvml)
    assert not result.found and result.gpus == ()
    assert words in result.reason
    assert result.to_dict()["planning_default"] == "RTX 4090"


def test_zero_devices() -> None:
    result = probe(FakeNvml([]))
    assert not result.found
    assert result.reason == "the NVIDIA driver is running but reports no GPU"
    assert result.driver_version == "550.54.15"


def test_failure_while_counting_is_a_reason_and_still_shuts_down() -> None:
    class Broken(FakeNvml):
        def nvmlDeviceGetCount(self) -> int:
            raise NVMLError_GpuIsLost()

    result = probe(Broken())
    assert not result.found and "GpuIsLost" in result.reason


def test_missing_nvidia_ml_py_is_a_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    result = probe_gpus(environ={})
    assert not result.found and "pip install nvidia-ml-py" in result.reason


def test_real_pynvml_never_raises_whatever_the_machine() -> None:
    result = probe_gpus()
    assert isinstance(result, GpuProbe)
    assert result.found or result.reason


def test_cuda_visible_devices_is_reported() -> None:
    assert probe(FakeNvml([h100("0:1:0.0")]), CUDA_VISIBLE_DEVICES="1").cuda_visible_devices == "1"
    assert probe(FakeNvml([h100("0:1:0.0")])).cuda_visible_devices is None


def test_probe_serializes_to_json() -> None:
    import json

    nvml = FakeNvml([h100("00000000:18:00.0", nvlinks={0: SWITCH}, compute=[(1, GiB)]),
                     h100("00000000:2A:00.0", nvlinks={0: SWITCH})], process_names={1: "python"})
    data = json.loads(json.dumps(probe(nvml).to_dict()))
    assert data["gpus"][0]["nvlink_peers"] == [1] and data["gpus"][0]["nvswitch"] is True
    assert data["gpus"][0]["processes"] == [{"pid": 1, "name": "python", "used_memory_bytes": GiB,
                                             "kind": "compute"}]
    assert data["gpus"][0]["catalog_name"] == "H100 SXM" and data["gpus"][0]["compute_capability"] == "9.0"
    assert "planning_default" not in data


# ---- import hygiene -------------------------------------------------------------------------------
def test_planner_imports_no_pynvml_or_heavy_stack() -> None:
    code = (
        "import sys\n"
        "import llmplan.planner.units, llmplan.planner.gpus, llmplan.planner.gpu_catalog\n"
        "import llmplan.planner.nvml_probe, llmplan.cli.gpus\n"
        "llmplan.planner.gpus.lookup_gpu('H100')\n"
        "bad = [m for m in ('pynvml', 'torch', 'transformers', 'ray') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

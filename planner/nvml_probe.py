"""Ask NVML which GPUs this machine has: the only module that touches pynvml.

`probe_gpus()` imports pynvml (nvidia-ml-py) only when called, and takes the module as a parameter
so tests pass a fake with the same functions and exception classes. It never raises for a machine
without GPUs: a missing library, an unloaded driver or zero devices come back as a `GpuProbe` with
no GPUs and a `reason` sentence. What one device cannot report (NVLink on a PCIe card, processes
inside a container...) becomes a note on that device, not an error.

NVLink peers: for every active link, the remote end's PCI bus id is matched against the local GPUs'
bus ids. Links that end at an NVSwitch (HGX/DGX boards) connect a GPU to every other GPU on the
switches, so all GPUs with switch links are each other's peers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .gpus import GpuProbe, GpuProcess, ProbedGpu, match_nvml_name

_NVLINK_MAX_LINKS_FALLBACK = 18  # NVML_NVLINK_MAX_LINKS in older nvidia-ml-py releases
_FEATURE_ENABLED = 1  # NVML_FEATURE_ENABLED
_DEVICE_TYPE_SWITCH = 2  # NVML_NVLINK_DEVICE_TYPE_SWITCH

BusKey = tuple[int, int, int]  # PCI (domain, bus, device)


def load_nvml() -> ModuleType | None:
    """The pynvml module, or None when nvidia-ml-py is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def probe_gpus(nvml: ModuleType | Any | None = None, *, environ: Mapping[str, str] | None = None) -> GpuProbe:
    """The GPUs NVML reports, or an empty probe whose `reason` says why there are none.

    ``nvml``: the pynvml module or a stand-in with its interface; None imports pynvml.
    ``environ``: where to read CUDA_VISIBLE_DEVICES (default: this process's environment).
    """
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if nvml is None:
        nvml = load_nvml()
        if nvml is None:
            return GpuProbe(
                reason="nvidia-ml-py is not installed, so NVML cannot be asked: pip install nvidia-ml-py",
                cuda_visible_devices=visible,
            )
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        return GpuProbe(reason=_init_failure(nvml, error), cuda_visible_devices=visible)
    try:
        return _probe_initialized(nvml, visible)
    except nvml.NVMLError as error:
        return GpuProbe(reason=f"NVML failed while listing GPUs ({_error_text(error)}); check that `nvidia-smi` works",
                        cuda_visible_devices=visible)
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


# ---- errors -----------------------------------------------------------------------------------
def _is(nvml: Any, error: BaseException, kind: str) -> bool:
    """Whether ``error`` is pynvml's NVMLError_<kind> (classes pynvml generates per error code)."""
    cls = getattr(nvml, f"NVMLError_{kind}", None)
    return isinstance(cls, type) and isinstance(error, cls)


def _error_text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # str() of a pynvml error asks the library, which may be gone
        return f"NVML error {getattr(error, 'value', '?')}"


def _init_failure(nvml: Any, error: BaseException) -> str:
    if _is(nvml, error, "LibraryNotFound"):
        return ("no NVIDIA driver found (the NVML library libnvidia-ml.so.1 is missing): "
                "this machine has no NVIDIA GPU, or its driver is not installed")
    if _is(nvml, error, "DriverNotLoaded"):
        return "the NVIDIA driver is installed but not loaded: check that `nvidia-smi` works"
    if _is(nvml, error, "NoPermission"):
        return "NVML refused access (no permission): run as a user allowed to use the GPU devices"
    return f"NVML could not start ({_error_text(error)}): check that `nvidia-smi` works"


@dataclass
class _Reader:
    """Calls NVML for one device, turning each unanswerable query into a note and a default."""

    nvml: Any
    notes: list[str]

    def get(self, what: str, fn: Callable[..., Any] | None, *args: Any, default: Any = None) -> Any:
        if fn is None:
            self.notes.append(f"{what}: not available in this nvidia-ml-py")
            return default
        try:
            return fn(*args)
        except self.nvml.NVMLError as error:
            self.notes.append(f"{what}: {_error_text(error)}")
            return default

    def first(self, what: str, functions: tuple[Callable[..., Any] | None, ...], *args: Any, default: Any = None) -> Any:
        """The first of ``functions`` the driver has: newer pynvml calls (``_v3``) that an older driver
        lacks raise FunctionNotFound, and the older variant answers instead."""
        available = [fn for fn in functions if fn is not None]
        for fn in available[:-1]:
            try:
                return fn(*args)
            except self.nvml.NVMLError as error:
                if not _is(self.nvml, error, "FunctionNotFound"):
                    self.notes.append(f"{what}: {_error_text(error)}")
                    return default
        return self.get(what, available[-1] if available else None, *args, default=default)


# ---- values -----------------------------------------------------------------------------------
def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _cuda_version(value: Any) -> str:
    """12040 -> "12.4" (NVML encodes CUDA versions as 1000 * major + 10 * minor)."""
    if not isinstance(value, int) or value <= 0:
        return ""
    return f"{value // 1000}.{(value % 1000) // 10}"


def _bus_key(pci: Any) -> BusKey | None:
    """(domain, bus, device) of an nvmlPciInfo_t: from its busId text, else its integer fields."""
    text = _text(getattr(pci, "busId", b"")) or _text(getattr(pci, "busIdLegacy", b""))
    parts = re.split(r"[:.]", text.strip())
    try:
        if len(parts) == 4:
            return int(parts[0], 16), int(parts[1], 16), int(parts[2], 16)
        if len(parts) == 3:
            return 0, int(parts[0], 16), int(parts[1], 16)
    except ValueError:
        pass
    if all(hasattr(pci, name) for name in ("domain", "bus", "device")):
        return int(pci.domain), int(pci.bus), int(pci.device)
    return None


def _bus_id_text(pci: Any) -> str:
    text = _text(getattr(pci, "busId", b"")) or _text(getattr(pci, "busIdLegacy", b""))
    return text.strip().upper()


# ---- one device -------------------------------------------------------------------------------
@dataclass
class _RawDevice:
    index: int
    handle: Any
    reader: _Reader
    bus: BusKey | None = None
    bus_id: str = ""
    remote_buses: tuple[BusKey, ...] = ()
    nvswitch: bool = False


def _nvlinks(nvml: Any, handle: Any) -> tuple[tuple[BusKey, ...], bool]:
    """PCI keys at the far end of each active NVLink, and whether any link ends at an NVSwitch."""
    get_state = getattr(nvml, "nvmlDeviceGetNvLinkState", None)
    if get_state is None:
        return (), False
    remotes: list[BusKey] = []
    switch = False
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", _NVLINK_MAX_LINKS_FALLBACK)):
        try:
            active = get_state(handle, link) == _FEATURE_ENABLED
        except nvml.NVMLError as error:
            if link == 0 and _is(nvml, error, "NotSupported"):
                return (), False  # no NVLink on this card
            continue  # a link number past this card's count
        if not active:
            continue
        if _remote_is_switch(nvml, handle, link):
            switch = True
            continue
        try:
            key = _bus_key(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link))
        except nvml.NVMLError:
            continue
        if key is not None:
            remotes.append(key)
    return tuple(remotes), switch


def _remote_is_switch(nvml: Any, handle: Any, link: int) -> bool:
    get_type = getattr(nvml, "nvmlDeviceGetNvLinkRemoteDeviceType", None)
    if get_type is None:
        return False
    try:
        return get_type(handle, link) == getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", _DEVICE_TYPE_SWITCH)
    except nvml.NVMLError:
        return False


def _processes(nvml: Any, handle: Any, reader: _Reader, names: dict[int, str | None]) -> tuple[GpuProcess, ...]:
    found: dict[int, GpuProcess] = {}
    for kind, function in (("compute", "nvmlDeviceGetComputeRunningProcesses"),
                           ("graphics", "nvmlDeviceGetGraphicsRunningProcesses")):
        variants = (getattr(nvml, function, None), getattr(nvml, f"{function}_v2", None))
        for info in reader.first(f"{kind} processes", variants, handle, default=()) or ():
            pid = int(info.pid)
            used = getattr(info, "usedGpuMemory", None)
            used = int(used) if isinstance(used, int) else None
            previous = found.get(pid)
            if previous is not None:
                both = max((m for m in (previous.used_memory_bytes, used) if m is not None), default=None)
                found[pid] = GpuProcess(pid, previous.name, both, "compute+graphics")
                continue
            if pid not in names:
                names[pid] = _process_name(nvml, pid)
            found[pid] = GpuProcess(pid, names[pid], used, kind)
    return tuple(sorted(found.values(), key=lambda process: process.pid))


def _process_name(nvml: Any, pid: int) -> str | None:
    get_name = getattr(nvml, "nvmlSystemGetProcessName", None)
    if get_name is None:
        return None
    try:
        return _text(get_name(pid)) or None
    except nvml.NVMLError:  # not found (another pid namespace) or no permission
        return None


def _device(raw: _RawDevice, peers: tuple[int, ...], driver: str, cuda: str,
            names: dict[int, str | None]) -> ProbedGpu:
    nvml, handle, reader = raw.reader.nvml, raw.handle, raw.reader
    name = _text(reader.get("name", nvml.nvmlDeviceGetName, handle, default="")) or "unknown NVIDIA GPU"
    memory = reader.get("memory", nvml.nvmlDeviceGetMemoryInfo, handle)
    capability = reader.get("compute capability", nvml.nvmlDeviceGetCudaComputeCapability, handle, default=(0, 0))
    processes = _processes(nvml, handle, reader, names)
    return ProbedGpu(
        index=raw.index,
        name=name,
        uuid=_text(reader.get("UUID", nvml.nvmlDeviceGetUUID, handle, default="")),
        memory_total_bytes=int(getattr(memory, "total", 0) or 0),
        memory_used_bytes=int(getattr(memory, "used", 0) or 0),
        memory_free_bytes=int(getattr(memory, "free", 0) or 0),
        compute_capability=tuple(int(part) for part in capability),
        driver_version=driver,
        cuda_version=cuda,
        pci_bus_id=raw.bus_id,
        nvlink_peers=peers,
        nvswitch=raw.nvswitch,
        processes=processes,
        catalog=match_nvml_name(name),
        notes=tuple(reader.notes),
    )


# ---- all devices ------------------------------------------------------------------------------
def _probe_initialized(nvml: Any, visible: str | None) -> GpuProbe:
    system = _Reader(nvml, [])
    driver = _text(system.get("driver version", getattr(nvml, "nvmlSystemGetDriverVersion", None), default=""))
    cuda = _cuda_version(system.get("CUDA version", getattr(nvml, "nvmlSystemGetCudaDriverVersion", None), default=0))
    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        return GpuProbe(driver_version=driver, cuda_version=cuda, cuda_visible_devices=visible,
                        reason="the NVIDIA driver is running but reports no GPU", notes=tuple(system.notes))
    raws = _open_devices(nvml, count, system)
    peers = _peers(raws)
    names: dict[int, str | None] = {}
    gpus = tuple(_device(raw, peers[raw.index], driver, cuda, names) for raw in raws)
    reason = "" if gpus else "NVML lists GPUs but none could be opened (see notes)"
    return GpuProbe(gpus=gpus, driver_version=driver, cuda_version=cuda, reason=reason,
                    cuda_visible_devices=visible, notes=tuple(system.notes))


def _open_devices(nvml: Any, count: int, system: _Reader) -> list[_RawDevice]:
    raws: list[_RawDevice] = []
    for index in range(count):
        handle = system.get(f"GPU {index} skipped", nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            continue
        reader = _Reader(nvml, [])
        pci = reader.get("PCI info", nvml.nvmlDeviceGetPciInfo, handle)
        remotes, switch = _nvlinks(nvml, handle)
        bus, bus_id = (_bus_key(pci), _bus_id_text(pci)) if pci is not None else (None, "")
        raws.append(_RawDevice(index, handle, reader, bus, bus_id, remotes, switch))
    return raws


def _peers(raws: list[_RawDevice]) -> dict[int, tuple[int, ...]]:
    """index -> sorted indices of the local GPUs it reaches over NVLink (directly or via NVSwitch)."""
    by_bus = {raw.bus: raw.index for raw in raws if raw.bus is not None}
    on_switch = {raw.index for raw in raws if raw.nvswitch}
    peers: dict[int, set[int]] = {raw.index: set() for raw in raws}
    for raw in raws:
        for remote in raw.remote_buses:
            other = by_bus.get(remote)
            if other is not None and other != raw.index:
                peers[raw.index].add(other)
                peers[other].add(raw.index)  # a link is symmetric even if one side's query failed
        if raw.nvswitch:
            peers[raw.index] |= on_switch - {raw.index}
    return {index: tuple(sorted(linked)) for index, linked in peers.items()}

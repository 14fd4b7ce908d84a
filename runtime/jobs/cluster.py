"""The Ray cluster llmplan submits to, and what its GPUs are.

Which cluster: `--address`, else `$LLMPLAN_RAY_ADDRESS`, else llmplan's own local head (`ray start
--head`, started on first use and left running, so jobs outlive the command that submitted them; its
address is kept in ~/.llmplan/ray-head). `llmplan cluster stop` stops that local head. An address where
nothing answers is refused within seconds (Ray itself retries for minutes).

Ray's own log lines (its token notice, the raylet's warnings) go to ~/.llmplan/ray-client.log, not to the
terminal, which shows llmplan's lines only.

GPUs: every node is asked through Ray (a task pinned to it) what NVML sees there. A node without NVML
GPUs may declare logical ones: `ray start --num-gpus 2 --resources '{"llmplan_gpu_mib": 24576}'`
declares two GPUs of 24 GiB each (the resource's value is the memory of one GPU, in MiB).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmplan.runtime.jobs.admission import GpuSlot

ADDRESS_ENV = "LLMPLAN_RAY_ADDRESS"
NAMESPACE = "llmplan"
DECLARED_GPU_MIB = "llmplan_gpu_mib"
HEAD_FILE_ENV = "LLMPLAN_RAY_HEAD_FILE"
DEFAULT_HEAD_FILE = Path("~/.llmplan/ray-head")
HEAD_START_TIMEOUT_S = 120
HEAD_STARTED = "Ray runtime started"
STOP_GRACE_S = 10
REACH_TIMEOUT_S = 5
PROBE_TIMEOUT_S = 30
HEAD_RESOURCE = "node:__internal_head__"  # the resource Ray gives the head node only
RAY_TOKEN_FILE = Path("~/.ray/auth_token")
RAY_LOG_NAME = "ray-client.log"  # next to the head file
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class ClusterError(RuntimeError):
    """The cluster cannot be reached or started; the message says what to do."""


# ---- which cluster ------------------------------------------------------------------------------------
def ensure_ray(address: str | None = None) -> None:
    """Ray in this process, once: inside a job's driver it is already up; a recipe run directly (`llmplan
    generate`, tests) joins `address` or $LLMPLAN_RAY_ADDRESS, else starts a private local instance."""
    import ray

    if ray.is_initialized():
        return
    # "local": a new private instance, never whatever `ray start` last left in /tmp/ray (plain
    # ray.init() would join that, or hang on it when it is gone).
    target = address or os.environ.get(ADDRESS_ENV)
    if target:
        check_reachable(target, "--address" if address else f"${ADDRESS_ENV}")
    _ray_logs_to_file()
    ray.init(address=target or "local", include_dashboard=False, log_to_driver=False)
    _cluster_messages_to_log()


def connect(address: str | None = None) -> None:
    """Join the cluster (once per process): `address`, else $LLMPLAN_RAY_ADDRESS, else the local head."""
    _send_auth_token()  # before Ray is imported: it reads its configuration then
    import ray

    if ray.is_initialized():
        return
    given = address or os.environ.get(ADDRESS_ENV)
    if given:
        check_reachable(given, "--address" if address else f"${ADDRESS_ENV}")
    target = given or local_head_address(start=True)
    _ray_logs_to_file()
    try:
        ray.init(address=target, namespace=NAMESPACE, log_to_driver=False)
    except ConnectionError as error:
        raise ClusterError(f"cannot reach the Ray cluster at {target}: {error}; start it (`ray start --head`) "
                           f"or fix --address / ${ADDRESS_ENV}") from None
    _cluster_messages_to_log()


def check_reachable(address: str, given_by: str) -> None:
    """Refuse at once an address where nothing answers (`given_by`: the option or variable that set it)."""
    problem = _unreachable(address, REACH_TIMEOUT_S)
    if problem is not None:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({problem}); start one there with "
                           f"`ray start --head`, or leave {given_by} out to use llmplan's local head")


def _unreachable(address: str, timeout: float) -> str | None:
    """Why nothing answers a TCP connect to HOST:PORT (`ray://` allowed) within `timeout`; None when it does."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return "not HOST:PORT"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return "connection refused"
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except socket.gaierror:
        return f"unknown host {host}"
    except (OSError, OverflowError) as error:
        return getattr(error, "strerror", None) or str(error)


def _ray_logs_to_file() -> None:
    # Ray logs to the terminal from import on (its token notice on every local start, "Started a local Ray
    # instance"): those lines go to a file next to the head file instead. Before ray.init, which keeps the
    # "ray" logger's handlers (with configure_logging=False it would clear them, and Python's last-resort
    # handler would print its warnings to the terminal all the same).
    ray_logger = logging.getLogger("ray")
    if any(getattr(handler, "llmplan", False) for handler in ray_logger.handlers):
        return
    path = head_file().with_name(RAY_LOG_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    handler.llmplan = True  # type: ignore[attr-defined]
    for terminal in [h for h in ray_logger.handlers if not isinstance(h, logging.FileHandler)]:
        ray_logger.removeHandler(terminal)
    ray_logger.addHandler(handler)
    ray_logger.propagate = False


def _cluster_messages_to_log() -> None:
    # Ray's driver prints the cluster's warnings ("(raylet) node ... died", with colour codes) to stdout
    # from a background thread, into the middle of `--json` output. No public switch exists (ray 2.60), so
    # its printer is replaced by one writing them, uncoloured, to Ray's log file (see _ray_logs_to_file).
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "llmplan_log", False):
        return
    ray_logger = logging.getLogger("ray")

    def to_log(data: dict[str, Any], ignore_prefix: bool) -> None:
        for line in data.get("lines", ()):
            ray_logger.warning("(%s) %s", data.get("pid", "cluster"), ANSI_ESCAPE.sub("", str(line)))

    to_log.llmplan_log = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_log


def _send_auth_token() -> None:
    # Ray >= 2.59 starts `ray start --head` clusters with token authentication and keeps the token in
    # ~/.ray/auth_token, but a client joining by address sends it only with RAY_AUTH_MODE=token.
    if os.environ.get("RAY_AUTH_TOKEN") or RAY_TOKEN_FILE.expanduser().is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def head_file() -> Path:
    return Path(os.environ.get(HEAD_FILE_ENV) or DEFAULT_HEAD_FILE).expanduser()


def local_head_address(*, start: bool) -> str | None:
    """The address of llmplan's local head if it is up; with `start`, start it when it is not."""
    path = head_file()
    if path.is_file():
        address = json.loads(path.read_text())["address"]
        if _listening(address):
            return address
    if not start:
        return None
    return start_local_head(path)


def head_temp_dir(path: Path) -> Path:
    """The Ray temp dir of the head kept in `path`: its own, so that a plain ray.init() elsewhere does not find
    (and join) it, and no other head (another head file) moves its `session_latest`. Short: Ray's socket
    paths must stay under 107 bytes."""
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return Path(f"/tmp/llmplan-ray-{os.getuid()}-{key}")


def start_local_head(path: Path) -> str:
    """`ray start --head --block` in a session of its own (it outlives this command); its pid is kept so that
    `stop_local_head` stops this head only, never another Ray on the machine (`ray stop` would)."""
    port = _free_port()
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.with_name(path.name + ".log")
    temp_dir = head_temp_dir(path)
    command = [_ray_executable(), "start", "--head", "--block", f"--port={port}", "--include-dashboard=false",
               "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    print(f"starting a local Ray head for llmplan jobs on port {port} (`llmplan cluster stop` stops it)",
          file=sys.stderr)
    with log.open("w") as sink:
        head = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    address = f"127.0.0.1:{port}"
    started = time.monotonic()
    deadline = started + HEAD_START_TIMEOUT_S
    while not (_listening(address) and HEAD_STARTED in log.read_text()):
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            raise ClusterError(f"`{' '.join(command)}` failed: {log.read_text().strip()[-500:]}")
        time.sleep(0.2)
    path.write_text(json.dumps({"address": address, "pid": head.pid, "temp_dir": str(temp_dir)}))
    print(f"started the local Ray head ({time.monotonic() - started:.1f} s)", file=sys.stderr)
    return address


def stop_local_head() -> bool:
    """Stop llmplan's local head and every job on it; False when none was running. Ray drains for up
    to 30 s on SIGTERM; after STOP_GRACE_S what is left is killed."""
    path = head_file()
    if local_head_address(start=False) is None:
        return False
    pid = json.loads(path.read_text())["pid"]
    tree = [pid, *descendants(pid)]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return True


def descendants(root: int) -> list[int]:
    """Every process below `root`, read from /proc (Ray starts its workers in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, pending = [], [root]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def is_running(pid: int) -> bool:
    """Whether `pid` still runs. A process that has exited but that its parent has not reaped yet (a zombie:
    the head, in the process that started it) has ended: taken for running, it kept `stop_local_head` waiting
    its whole STOP_GRACE_S for a head that had stopped in 2 s."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # gone between the two looks, or no /proc (not Linux): what kill said
        return not Path("/proc/self").is_dir()
    return state != "Z"


def _ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _listening(address: str) -> bool:
    return _unreachable(address, timeout=1) is None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- what the cluster has -----------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeView:
    node_id: str
    address: str
    is_head: bool
    cpus: float
    gpus: tuple[GpuSlot, ...]
    gpu_source: str  # nvml | declared | none
    processes: tuple[dict[str, Any], ...] = ()


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def node_address(node_id: str) -> str | None:
    """The node's IP (Ray's NodeManagerAddress); None when the node is no longer alive."""
    return next((node.get("NodeManagerAddress") or None for node in alive_nodes() if node["NodeID"] == node_id), None)


def head_node_id() -> str:
    return next(node["NodeID"] for node in alive_nodes() if HEAD_RESOURCE in node.get("Resources", {}))


def nodes() -> list[NodeView]:
    """Every live node with its GPUs: NVML's, asked on the node itself, else the ones it declares."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    found = alive_nodes()
    probe = ray.remote(num_cpus=0)(_probe_node)
    probes = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
              for node in found]
    views = []
    for node, ref in zip(found, probes):
        try:
            report = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            continue  # the node died (or hangs) since Ray listed it: it has nothing to offer
        views.append(_node_view(node, report))
    return views


def gpu_slots(views: list[NodeView] | None = None) -> list[GpuSlot]:
    return [slot for view in (views if views is not None else nodes()) for slot in view.gpus]


def _probe_node() -> dict[str, Any]:
    from llmplan.planner.nvml_probe import probe_gpus

    probe = probe_gpus()
    return {
        "gpus": [{"index": gpu.index, "name": gpu.name, "total": gpu.memory_total_bytes, "free": gpu.memory_free_bytes}
                 for gpu in probe.gpus],
        "processes": [{"gpu": gpu.index, "pid": process.pid, "bytes": process.used_memory_bytes}
                      for gpu in probe.gpus for process in gpu.processes],
    }


def _node_view(node: dict[str, Any], report: dict[str, Any]) -> NodeView:
    resources = node.get("Resources", {})
    node_id = node["NodeID"]
    if report["gpus"]:
        slots = tuple(GpuSlot(node_id, g["index"], g["total"], g["free"], g["name"]) for g in report["gpus"])
        source = "nvml"
    elif resources.get("GPU") and resources.get(DECLARED_GPU_MIB):
        per_gpu = int(resources[DECLARED_GPU_MIB]) * 2**20
        slots = tuple(GpuSlot(node_id, i, per_gpu, None, "declared") for i in range(int(resources["GPU"])))
        source = "declared"
    else:
        slots, source = (), "none"
    return NodeView(node_id=node_id, address=node.get("NodeManagerAddress", ""),
                    is_head=HEAD_RESOURCE in resources, cpus=float(resources.get("CPU", 0)),
                    gpus=slots, gpu_source=source, processes=tuple(report["processes"]))


def cluster_hardware(slots: list[GpuSlot], gpus: int | None):
    """The `Hardware` to plan for on this cluster: the node with the most GPUs; None when it has none (CPU)."""
    from llmplan.planner.gpus import gpu_with_memory, match_nvml_name
    from llmplan.planner.hardware import Hardware

    if not slots:
        return None
    per_node: dict[str, list[GpuSlot]] = {}
    for slot in slots:
        per_node.setdefault(slot.node_id, []).append(slot)
    node = max(per_node.values(), key=lambda s: (len(s), max(g.total_bytes for g in s)))
    chosen = sorted(node, key=lambda g: g.free_bytes if g.free_bytes is not None else g.total_bytes,
                    reverse=True)[: gpus or len(node)]
    memory = min(g.free_bytes if g.free_bytes is not None else g.total_bytes for g in chosen)
    card = match_nvml_name(chosen[0].name) if chosen[0].free_bytes is not None else None
    notes = ()
    if gpus and gpus > len(node):
        notes = (f"the cluster's largest node has {len(node)} GPU(s); planning for {gpus} like them",)
    return Hardware(card or gpu_with_memory(chosen[0].total_bytes), gpus or len(node), memory, "cluster", notes=notes)

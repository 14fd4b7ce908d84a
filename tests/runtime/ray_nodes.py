"""Real Ray nodes for the scheduler tests: `ray start --head` and `ray start --address` processes on this
machine, each in its own process group so that a test can stop (or kill, like a crash) exactly one node."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmplan.runtime.jobs.cluster import HEAD_STARTED, descendants

START_TIMEOUT_S = 90


@dataclass
class RayNode:
    process: subprocess.Popen
    log: Path
    address: str  # the head's GCS address (the one the node started or joined)

    def client_env(self) -> dict[str, str]:
        """What an llmplan process needs to submit to this cluster. The node runs without token authentication
        (start_node), so its clients must too: a client expecting tokens drops what the cluster's workers send
        back on their own (a streaming generator's items) and waits for ever."""
        return {"LLMPLAN_RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled"}

    def kill(self) -> None:
        """Kill the node's processes at once, like a machine that dies: `ray start`, its raylet and the other
        services, and every worker process (Ray starts workers in process groups of their own)."""
        if self.process.poll() is not None:
            return
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_node(*, head_address: str | None = None, port: int | None = None, cpus: int = 2, gpus: int = 0,
               gpu_mib: int | None = None, env: dict[str, str] | None = None) -> RayNode:
    """A head (no `head_address`) or a worker joining `head_address`; `gpus` logical GPUs of `gpu_mib` each."""
    ray = str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    command = [ray, "start", "--block", f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--disable-usage-stats"]
    if head_address is None:
        port = port or free_port()
        command += ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"]
        address = f"127.0.0.1:{port}"
    else:
        command += [f"--address={head_address}"]
        address = head_address
    if gpu_mib is not None:
        command.append("--resources=" + json.dumps({"llmplan_gpu_mib": gpu_mib}))
    log = Path(temp) / "start.log"
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=environment,
                                   start_new_session=True)
    node = RayNode(process, log, address)
    deadline = time.monotonic() + START_TIMEOUT_S
    while HEAD_STARTED not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            node.kill()
            raise RuntimeError(f"ray start failed: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return node


@contextlib.contextmanager
def joined(address: str) -> Iterator[None]:
    """This test process joined to the cluster at `address` for the block (its commands can then run here)."""
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()

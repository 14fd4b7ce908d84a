"""llmplan's local Ray head as a user meets it: its own Ray temp dir, and a terminal free of Ray's own lines."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")

from llmplan.runtime.jobs.cluster import (  # noqa: E402
    HEAD_FILE_ENV,
    RAY_LOG_NAME,
    descendants,
    is_running,
    start_local_head,
    stop_local_head,
)

LLMPLAN = str(Path(sys.executable).with_name("llmplan"))


def llmplan(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The command with `env` on top of this process's environment (no cluster address but the one `env` gives)."""
    environment = {key: value for key, value in os.environ.items() if key != "LLMPLAN_RAY_ADDRESS"}
    return subprocess.run([LLMPLAN, *args], capture_output=True, text=True, timeout=180, env={**environment, **env})


def session_of(head_file: Path) -> Path:
    """The Ray session dir the head's own GCS server writes its logs in (read from its command line)."""
    pid = json.loads(head_file.read_text())["pid"]
    for child in descendants(pid):
        try:
            arguments = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arguments[0].endswith(b"gcs_server"):
            log_dir = next(a for a in arguments if a.startswith(b"--log_dir=")).split(b"=", 1)[1].decode()
            return Path(log_dir).parent
    raise AssertionError(f"no gcs_server under pid {pid}")


def kill_head(head_file: Path) -> None:
    """Kill a local head at once, with everything under it (`stop_local_head` gives Ray up to 10 s to drain)."""
    if not head_file.exists():
        return
    pid = json.loads(head_file.read_text())["pid"]
    for process in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, signal.SIGKILL)


@pytest.fixture
def two_heads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """Two llmplan local heads (two head files, as two users' settings or two `LLMPLAN_RAY_HEAD_FILE`s give)."""
    files = (tmp_path / "first" / "ray-head", tmp_path / "second" / "ray-head")
    temp_dirs = []
    try:
        for head_file in files:
            start_local_head(head_file)
            temp_dirs.append(session_of(head_file).parent)
        yield files
    finally:
        for head_file in files:
            kill_head(head_file)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_each_local_head_keeps_its_own_temp_dir_and_is_joined_after_another_stops(
        two_heads: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Heads shared one Ray temp dir: once the second stopped, the first's `session_latest` named a dead session."""
    first, second = two_heads
    first_session = session_of(first)
    assert first_session.parent != session_of(second).parent

    monkeypatch.setenv(HEAD_FILE_ENV, str(second))
    assert stop_local_head()
    assert (first_session.parent / "session_latest").resolve() == first_session.resolve()
    view = llmplan("cluster", "--json",
                   env={HEAD_FILE_ENV: str(first), "LLMPLAN_DB": f"sqlite:///{tmp_path / 'jobs.db'}"})
    assert view.returncode == 0, view.stderr
    assert [node["head"] for node in json.loads(view.stdout)["nodes"]] == [True]


def test_generate_prints_no_ray_lines(tiny_llama: Path, tmp_path: Path) -> None:
    """Every `generate` printed Ray's "Token authentication is enabled..." (and its other log lines) among
    llmplan's; they go to the log file next to the head file."""
    head_file = tmp_path / "ray-head"
    try:
        done = llmplan("generate", str(tiny_llama), "hello there", "--max-new-tokens", "2",
                       env={HEAD_FILE_ENV: str(head_file), "LLMPLAN_DB": f"sqlite:///{tmp_path / 'jobs.db'}",
                            "LLMPLAN_JOBS_DIR": str(tmp_path / "jobs")})
    finally:  # the head `generate` started (and its warm replica) would idle through the rest of the session
        kill_head(head_file)
    assert done.returncode == 0, done.stderr
    for ray_line in ("Token authentication", "Ray instance", "(raylet)", "\x1b["):
        assert ray_line not in done.stderr, done.stderr
    assert "Connected to Ray cluster" in (tmp_path / RAY_LOG_NAME).read_text()  # its lines went to the log


def test_a_process_that_has_exited_is_not_running_before_its_parent_reaps_it() -> None:
    """`stop_local_head` waits for the head to exit; in the process that started the head, the exited head stays
    a zombie until reaped and was taken for running, so every stop there waited its whole grace period."""
    assert is_running(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # it has exited; not reaped yet: a zombie
        assert not is_running(child.pid)
    finally:
        child.wait()
    assert not is_running(child.pid)

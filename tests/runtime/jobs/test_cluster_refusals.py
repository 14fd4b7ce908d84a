"""`llmplan submit` on a real CPU-only Ray cluster (the session's head, 4 CPUs): plans its nodes could never
run are refused before anything is queued; a plan that moved from the asked GPUs to the CPU says so; two
job stores keep their jobs' logs apart."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from llmplan.runtime.store.opening import open_store  # noqa: E402
from llmplan.runtime.store.repository import JobFilter, get_job, list_jobs  # noqa: E402

from ..conftest import run_llmplan_here  # noqa: E402

TINY = ["--template", "alpaca", "--seq-len", "64", "--batch-size", "2", "--max-steps", "1", "--warmup-steps", "0"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def recorded_jobs(db: str) -> list:
    engine = open_store(db)
    try:
        return list_jobs(engine, JobFilter())
    finally:
        engine.dispose()


def test_more_workers_than_the_cluster_has_cpus_are_refused(joined_cluster_env, tiny_llama: Path,
                                                            tiny_alpaca: Path) -> None:
    result = run_llmplan_here("submit", "finetune", "--model", str(tiny_llama), "--data", str(tiny_alpaca), *TINY,
                         "--workers", "1000")
    assert result.returncode == 1, result.stderr
    [line] = error_lines(result.stderr)
    assert re.fullmatch(r"Error: refused: the plan needs 1000 CPU workers with \d+ MiB of host memory each; the "
                        r"cluster holds 4 \(4 CPUs on 1 node\); pass --workers 4", line), result.stderr
    assert "Traceback" not in result.stderr
    assert recorded_jobs(joined_cluster_env["LLMPLAN_DB"]) == []


def test_a_cpu_plan_no_nodes_memory_holds_is_refused(joined_cluster_env, tmp_path: Path, tiny_alpaca: Path) -> None:
    """A 70B checkpoint (its config and a weights file: nothing is loaded before the refusal) on the CPU."""
    model = tmp_path / "llama-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 4096, "torch_dtype": "float16"}))
    (model / "model.safetensors").write_bytes(b"")
    result = run_llmplan_here("submit", "finetune", "--model", str(model), "--data", str(tiny_alpaca),
                              "--template", "alpaca")
    assert result.returncode == 1, result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith("Error: refused: the plan needs 1 CPU worker with ") and "GiB of host memory each; the " \
        "cluster's largest node has" in line and line.endswith("or add a node with more memory"), line
    assert recorded_jobs(joined_cluster_env["LLMPLAN_DB"]) == []


@pytest.mark.slow  # two 1-step runs of the tiny model
def test_gpus_planned_on_the_cpu_say_so_and_two_stores_keep_their_logs_apart(
        joined_cluster_env, tmp_path: Path, tiny_llama: Path, tiny_alpaca: Path) -> None:
    stores = [joined_cluster_env["LLMPLAN_DB"], f"sqlite:///{tmp_path / 'other.db'}"]
    queued = []
    for db in stores:
        result = run_llmplan_here("submit", "finetune", "--model", str(tiny_llama), "--data", str(tiny_alpaca), *TINY,
                             "--gpus", "1", "--db", db, "--json")
        assert result.returncode == 0, result.stderr
        assert "note: --gpus 1 asked for GPUs but the cluster has none: planned for the CPU instead" in result.stderr
        queued.append(json.loads(result.stdout))
    assert [document["id"] for document in queued] == [1, 1]
    assert queued[0]["log"] != queued[1]["log"]
    for db, document in zip(stores, queued):
        job = wait_until_ended(db, 1)
        assert job.log_path == document["log"] and Path(job.log_path).is_file()
        shown = run_llmplan_here("logs", "1", "--db", db)
        assert shown.returncode == 0 and shown.stdout == Path(document["log"]).read_text()


def wait_until_ended(db: str, job_id: int, timeout: float = 240):
    engine = open_store(db)
    try:
        deadline = time.monotonic() + timeout
        while not (job := get_job(engine, job_id)).status.is_terminal():
            assert time.monotonic() < deadline, f"job {job_id} of {db} is {job.status.value} after {timeout}s"
            time.sleep(0.5)
        return job
    finally:
        engine.dispose()

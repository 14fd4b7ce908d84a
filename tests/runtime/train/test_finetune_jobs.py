"""Fine-tuning jobs end to end on the CPU: submit (detached), Ray Train workers, SmolLM2 LoRA, the record."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner


pytest.importorskip("ray")

from ..conftest import run_llmplan  # noqa: E402

from llmplan.cli.main import cli  # noqa: E402
from llmplan.runtime.store.opening import open_store  # noqa: E402
from llmplan.runtime.store.repository import JobStatus, get_job, get_job_details  # noqa: E402

MODEL = "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parents[3] / "examples" / "data" / "alpaca_llmplan.jsonl"
SMALL = ["--micro-batch", "2", "--grad-accum", "1", "--seq-len", "96", "--lr", "1e-3", "--warmup-steps", "2"]


def submit(*args: str):
    return run_llmplan("submit", "finetune", "--model", MODEL, "--data", str(DATA), *SMALL, *args)


@pytest.mark.slow
def test_lora_job_learns_records_its_curve_and_its_adapter_generates(cluster_env, tmp_path: Path) -> None:
    env = cluster_env
    result = submit("--max-steps", "12", "--save-every", "6", "--output", str(tmp_path / "out"), "--wait", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "succeeded", data
    details = get_job_details(open_store(env["LLMPLAN_DB"]), data["id"])
    losses = [metric.loss for metric in details.metrics if metric.loss is not None]
    assert len(losses) >= 12
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3
    assert details.job.final_loss is not None and details.job.measured_tokens_per_s > 0
    adapter = Path(data["adapter_path"])
    assert (adapter / "adapter_config.json").exists() and (tmp_path / "out" / "loss.png").exists()
    generated = run_llmplan("generate", MODEL, "Convert 3 kilometres to metres.", "--adapter", str(adapter),
                            "--max-new-tokens", "8", "--json")
    assert generated.returncode == 0, generated.stderr


def test_a_broken_record_fails_before_anything_starts(env, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    lines = DATA.read_text().splitlines()[:6] + ['{"instruction": "Say hi", "output": ""}']
    broken.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(cli, ["submit", "finetune", "--model", MODEL, "--data", str(broken)])
    assert result.exit_code == 2
    assert f"{broken}:7: field output" in result.output
    assert not Path(env["LLMPLAN_DB"].removeprefix("sqlite:///")).exists() or \
        CliRunner().invoke(cli, ["jobs", "--json"]).output.strip() in ("[]", "")


def test_a_yaml_spec_with_an_unknown_key_is_refused(env, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(f"task: finetune\nmodel: {MODEL}\ndata: {DATA}\nmicro-batch: 2\nlearning_rate: 0.1\n")
    result = CliRunner().invoke(cli, ["submit", str(spec)])
    assert result.exit_code == 2
    assert "unknown key(s) learning_rate" in result.output


@pytest.mark.slow
def test_a_cancelled_run_resumes_from_its_checkpoint_as_a_linked_job(cluster_env, tmp_path: Path) -> None:
    env, out = cluster_env, tmp_path / "out"
    result = submit("--max-steps", "8", "--save-every", "2", "--output", str(out))
    assert result.returncode == 0, result.stderr
    job_id = int(result.stdout.strip())
    checkpoint = out / "checkpoints" / "step-4"
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert checkpoint.exists(), "no checkpoint appeared"
    cancelled = run_llmplan("cancel", str(job_id))
    assert cancelled.stdout.strip() == f"job {job_id}: cancelled", cancelled.stderr
    resumed = run_llmplan("submit", "finetune", "--model", MODEL, "--data", str(DATA), "--resume", str(job_id),
                          "--wait", "--json")
    assert resumed.returncode == 0, resumed.stderr
    engine = open_store(env["LLMPLAN_DB"])
    second = get_job_details(engine, json.loads(resumed.stdout)["id"])
    assert second.job.retry_of == job_id and second.job.attempt == 2
    steps = [metric.step for metric in second.metrics]
    assert min(steps) > 4 - 1 and max(steps) == 8
    assert get_job(engine, job_id).status is JobStatus.CANCELLED


def test_a_one_worker_cpu_job_runs_the_recipe_in_this_process_without_ray(tiny_llama, tiny_alpaca, tmp_path,
                                                                          monkeypatch) -> None:
    """One CPU worker needs no process group: the job trains here (no Ray Train, not even Ray) and records
    every logged step, its checkpoints, the adapter and the results as a Ray Train run does."""
    import ray

    from llmplan.planner.plan import FinetuneAsk, plan_finetune
    from llmplan.planner.resolve import resolve_model
    from llmplan.runtime.train import finetune_job, ray_train
    from llmplan.runtime.train.train import saved_checkpoints
    from llmplan.runtime.train.train_config import DataConfig, TrainConfig

    def started_ray_train(*args, **kwargs):
        raise AssertionError("a one-worker CPU job started Ray Train")

    monkeypatch.setattr(ray_train, "run_ray_train", started_ray_train)
    ray_before = ray.is_initialized()  # False, unless an earlier test of the session left one in this process
    plan = plan_finetune(FinetuneAsk(model=str(tiny_llama), spec=resolve_model(str(tiny_llama)).spec, batch_size=2,
                                     micro_batch=2, seq_len=64), None)
    config = TrainConfig(model=str(tiny_llama), data=DataConfig(path=str(tiny_alpaca), template="alpaca"),
                         output_dir=str(tmp_path / "out"), method="lora", precision="fp32", micro_batch=2, grad_accum=1,
                         seq_len=64, lr=1e-3, warmup_steps=1, max_steps=4, save_every=2, device="cpu")
    engine = open_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    job = finetune_job.submit(engine, plan, config, name="in process", submitter="test")

    outcome = finetune_job.run(engine, job.id, config)

    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert ray.is_initialized() == ray_before
    details = get_job_details(engine, job.id)
    assert [metric.step for metric in details.metrics] == [1, 2, 3, 4]
    assert details.job.final_loss is not None
    assert details.job.measured_tokens_per_s > 0
    assert [path.name for path in saved_checkpoints(config.output_dir)] == ["step-2", "step-4"]
    assert (Path(outcome.artifact) / "adapter_config.json").exists()

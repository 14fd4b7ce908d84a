"""What `llmplan submit` refuses or settles before it reaches the cluster: a model without local weights (with
what to pass instead), and a default output folder of its own for every job. Nothing here starts Ray: the
address points at a closed port, so a submission that went on would fail rather than queue."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmplan.cli.main import cli

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "alpaca_llmplan.jsonl"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    for key, value in {"LLMPLAN_DB": db, "LLMPLAN_JOBS_DIR": str(tmp_path / "jobs"), "LLMPLAN_CACHE": str(tmp_path / "cache"),
                       "LLMPLAN_RAY_ADDRESS": "127.0.0.1:1", "LLMPLAN_RAY_HEAD_FILE": str(tmp_path / "head")}.items():
        monkeypatch.setenv(key, value)
    return db


def queued(store: str) -> list:
    result = CliRunner().invoke(cli, ["jobs", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("submission", [
    ["finetune", "--model", "7B", "--data", str(DATA)],
    ["infer", "--model", "Llama-2-7B", "--prompt", "Hi"],
])
def test_a_catalog_model_without_local_weights_is_refused_with_what_to_pass(store: str, submission: list[str]) -> None:
    result = CliRunner().invoke(cli, ["submit", *submission])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1  # one line
    assert "Llama-2-7B has no local weights" in result.stderr
    assert "pass --model PATH/TO/Llama-2-7B" in result.stderr
    assert queued(store) == []


def test_a_missing_model_directory_is_refused_naming_the_option(store: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["submit", "finetune", "--model", str(tmp_path / "nowhere"), "--data", str(DATA)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: --model {tmp_path / 'nowhere'}: no such directory")
    assert queued(store) == []


def test_two_submissions_in_one_second_get_different_default_outputs(store: str, tmp_path: Path) -> None:
    from llmplan.cli.submit import submit_finetune
    from llmplan.runtime.jobs.submission import FinetuneSubmission, check_training_request, plan_training, submission_from

    options = submit_finetune.make_context("finetune", ["--model", "SmolLM2-135M", "--data", str(DATA)]).params
    submission = submission_from(FinetuneSubmission, options)
    check_training_request(submission)
    root = tmp_path / "jobs" / "store"
    outputs = [Path(plan_training(submission, lambda gpus: None, None, root)[1].output_dir) for _ in range(2)]
    assert outputs[0] != outputs[1]
    assert all(output.parent == root / "finetune" and output.name.startswith("SmolLM2-135M-") for output in outputs)


@pytest.mark.parametrize("kind", ["finetune", "infer"])
def test_what_a_cpu_refusal_says_to_pass_are_options_of_that_submit_command(kind: str) -> None:
    from llmplan.runtime.jobs.submission import smaller_cpu_plan
    from llmplan.cli.submit import spec_command

    options = {option for param in spec_command(kind).params for option in param.opts}
    for workers_that_fit in (0, 2):
        named = set(re.findall(r"--[a-z-]+", smaller_cpu_plan(kind, workers_that_fit)))
        assert named and named <= options, (kind, named - options)


def test_the_config_a_plan_fixes_copies_every_planned_field(tmp_path: Path) -> None:
    """One TrainConfig.from_plan for submission and the OOM re-plan: every field the plan decides is the plan's."""
    from llmplan.cli.submit import submit_finetune
    from llmplan.runtime.jobs.submission import FinetuneSubmission, plan_training, submission_from
    from llmplan.runtime.train.train_config import PLANNED

    words = ["--model", "SmolLM2-135M", "--data", str(DATA), "--workers", "2", "--lora-r", "4", "--lr", "1e-3"]
    submission = submission_from(FinetuneSubmission, submit_finetune.make_context("finetune", words).params)
    plan, config = plan_training(submission, lambda gpus: None, None, tmp_path)
    for name in PLANNED:
        assert getattr(config, name) == getattr(plan, name), name
    assert (config.lora_alpha, config.lr, config.workers, config.backend) == (8, 1e-3, 2, "ddp")

"""One submission, typed: the command line and a job spec (the dashboard's) read into the same dataclass, a
refused value names its field from the error itself, and a job's stored request round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmplan.cli.submit import SpecError, spec_key, spec_submission, submit_finetune, submit_infer
from llmplan.runtime.jobs.job_request import JobRequest
from llmplan.runtime.jobs.submission import (FinetuneSubmission, InferenceSubmission, Queueing, SubmissionError, load_items,
                                        submission_from)

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "alpaca_llmplan.jsonl"


def test_a_job_spec_and_the_command_line_give_the_same_submission() -> None:
    words = ["--model", "SmolLM2-135M", "--data", str(DATA), "--micro-batch", "4", "--max-steps", "30",
             "--no-gradient-checkpointing", "--lora-targets", "q_proj,v_proj", "--priority", "3"]
    typed = submission_from(FinetuneSubmission, submit_finetune.make_context("finetune", words).params)
    spec = {"task": "finetune", "model": "SmolLM2-135M", "data": str(DATA), "micro-batch": 4, "max-steps": 30,
            "gradient-checkpointing": False, "lora-targets": "q_proj,v_proj", "priority": 3}
    assert spec_submission(spec, where="spec") == ("finetune", typed)
    assert (typed.micro_batch, typed.max_steps, typed.queueing) == (4, 30, Queueing(priority=3))
    task, infer = spec_submission({"task": "infer", "model": "SmolLM2-135M", "prompt": "Hi"}, where="spec")
    assert (task, infer.prompts) == ("infer", ("Hi",))
    assert infer == submission_from(InferenceSubmission, submit_infer.make_context(
        "infer", ["--model", "SmolLM2-135M", "--prompt", "Hi"]).params)


@pytest.mark.parametrize(("key", "value"), [("max-steps", 0), ("micro-batch", "four"), ("method", "dora"),
                                            ("lora-dropout", 1.5), ("packing", "--db=x.db")])
def test_a_refused_spec_value_carries_its_key(key: str, value: object) -> None:
    spec = {"task": "finetune", "model": "SmolLM2-135M", "data": str(DATA), key: value}
    with pytest.raises(SpecError) as refused:
        spec_submission(spec, where="spec")
    assert refused.value.field == key


def test_a_missing_required_key_and_lora_options_with_full_are_named() -> None:
    with pytest.raises(SpecError) as refused:
        spec_submission({"task": "finetune", "data": str(DATA)}, where="spec")
    assert refused.value.field == "model"
    with pytest.raises(SpecError) as refused:
        spec_submission({"task": "finetune", "model": "7B", "data": str(DATA), "method": "full", "lora-r": 4},
                        where="spec")
    assert refused.value.field == "lora-r" and "--lora-r" in str(refused.value)


def test_a_submission_error_names_its_field_and_the_spec_key_of_it(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    with pytest.raises(SubmissionError) as refused:
        load_items(("Hi",), str(prompts))
    assert refused.value.field == "input_path" and spec_key("infer", refused.value.field) == "input"


def test_a_job_request_round_trips_and_reads_what_older_records_lack() -> None:
    request = JobRequest(runner="scheduler", max_retries=3, hardware={"gpu": "A100 80GB", "count": 1,
                         "memory_bytes": 80 * 2**30, "source": "catalog"}, config={"model": "m"}, margin=0.15,
                         jobs_dir="/jobs", model_cache="/cache")
    assert JobRequest.from_dict({"task": "finetune", **request.to_dict()}) == request
    assert request.card == "A100 80GB" and request.planned_hardware().count == 1
    old = JobRequest.from_dict({"task": "infer", "prompts": ["Hi"], "hardware": None})
    assert (old.card, old.max_retries, old.config, old.margin) == ("cpu", 2, None, None)
    assert "margin" not in old.to_dict() and "config" not in old.to_dict()


def test_a_planner_refusal_names_its_field_and_the_spec_key_of_it() -> None:
    """What the dashboard reports as the field at fault comes from the error, not from its message."""
    from llmplan.planner.request import RequestError
    from llmplan.runtime.jobs.submission import finetune_ask

    submission = FinetuneSubmission(model="SmolLM2-135M", data=str(DATA), lora_targets="q_proj,bogus_proj")
    with pytest.raises(RequestError) as refused:
        finetune_ask(submission)
    assert refused.value.field == "lora_targets" and spec_key("finetune", refused.value.field) == "lora-targets"

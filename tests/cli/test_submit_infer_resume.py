"""`llmplan submit infer`: what --resume JOB refuses before anything starts (no Ray, no model); its progress."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from llmplan.cli.main import cli
from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.repository import JobKind, JobSpec, JobStatus, create_job, transition


def store_with(tmp_path: Path, kind: JobKind, status: JobStatus) -> tuple[str, int]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    engine = open_store(url)
    try:
        job = create_job(engine, JobSpec(name="job", kind=kind, model="m", submitter="test", request={"prompts": []}))
        if status is not JobStatus.QUEUED:
            transition(engine, job.id, status)
        return url, job.id
    finally:
        engine.dispose()


def submit(*args: str):
    return CliRunner().invoke(cli, ["submit", "infer", *args])


def test_resume_refuses_a_finetuning_job_an_unknown_job_and_a_job_still_queued(tmp_path: Path) -> None:
    url, finetune = store_with(tmp_path / "a", JobKind.FINETUNE, JobStatus.CANCELLED)
    refused = submit("--resume", str(finetune), "--db", url)
    assert refused.exit_code == 2
    assert f"--resume {finetune}: job {finetune} is a finetune job: --resume here continues inference jobs" in refused.output

    unknown = submit("--resume", "99", "--db", url)
    assert unknown.exit_code == 2 and "--resume 99:" in unknown.output

    url, queued = store_with(tmp_path / "b", JobKind.INFER, JobStatus.QUEUED)
    waiting = submit("--resume", str(queued), "--db", url)
    assert waiting.exit_code == 2
    assert "only failed or cancelled jobs can be retried" in waiting.output


def test_submit_infer_needs_a_model_or_a_job_to_resume() -> None:
    missing = submit("--prompt", "hello")
    assert missing.exit_code == 2
    assert "Missing option '--model' (or --resume JOB to continue an inference job)" in missing.output


def test_following_an_inference_job_shows_its_tokens_per_second() -> None:
    from llmplan.cli.follow_job import progress_detail
    from llmplan.runtime.store.repository import MetricPoint

    assert progress_detail(MetricPoint(step=120, tokens_per_s=5321.7)) == "5,322 tokens/s"
    assert progress_detail(MetricPoint(step=3, loss=1.23456, tokens_per_s=900.0)) == "loss 1.2346"
    assert progress_detail(None) == ""

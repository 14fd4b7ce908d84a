"""Each bad input of #12 ("Bad input never gets a traceback"): one line naming the option or file:line, exit 2,
nothing queued or written. Submissions stop where they would join the cluster (see bad_input.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.repository import JobFilter, list_jobs

from bad_input import EXAMPLE_DATA, assert_refused, fingerprint, run


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "jobs.db"
    path.parent.mkdir()
    open_store(f"sqlite:///{path}").dispose()
    return path


def finetune(store: Path, *options: str, data: Path = EXAMPLE_DATA) -> list[str]:
    return ["submit", "finetune", "--model", "smollm2-135m-instruct", "--data", str(data), "--db", str(store),
            *options]


@pytest.mark.parametrize(("args", "name"), [
    (("show", "99999999999999999999999"), "JOB"),
    (("show", "²"), "JOB"),
    (("show", "0"), "JOB"),
    (("logs", "٣"), "JOB"),
    (("jobs", "--since", "99999999999m"), "--since"),
    (("jobs", "--since", "0001-01-01T00:00+01:00"), "--since"),
    (("jobs", "--limit", "9" * 5000), "--limit"),
])
def test_job_ids_and_history_filters(store: Path, args: tuple[str, ...], name: str) -> None:
    assert_refused(run(*args, "--db", str(store)), 2, name)


@pytest.mark.parametrize("command", ["show", "logs", "cancel"])
def test_a_job_that_does_not_exist_is_a_user_error_for_every_command(store: Path, command: str) -> None:
    assert_refused(run(command, "999", "--db", str(store)), 2, "no job 999")


@pytest.mark.parametrize(("args", "name"), [
    (("fit", "7B", "--tokens", "100000", "--epochs", "nan"), "--epochs"),
    (("fit", "7B", "--tokens", "100000", "--epochs", "inf"), "--epochs"),
    (("fit", "7B", "--task", "infer", "--method", "lora"), "--method"),
    (("fit", "7B", "--lora-targets", "bogus_proj"), "--lora-targets"),
    (("fit", "7B", "--gpu-mem", "1" * 400 + "GiB"), "--gpu-mem"),
    (("fit", "7B", "--gpu-mem", "99999999999999999999TiB"), "--gpu-mem"),
    (("fit", "7B", "--gpus", "99999999999999999999"), "--gpus"),
    (("estimate", "7B", "--seq-len", "1e8"), "--seq-len"),
    (("estimate", "7B", "--seq-len", "100000000"), "--seq-len"),
    (("estimate", "7B", "--lora-targets", "bogus_proj"), "--lora-targets"),
    (("estimate", "7B", "--nonsense"), "--nonsense"),
])
def test_planning_options(args: tuple[str, ...], name: str) -> None:
    assert_refused(run(*args), 2, name)


@pytest.mark.parametrize(("options", "name"), [
    (("--priority", "1e23"), "--priority"),
    (("--seq-len", "1e8"), "--seq-len"),
    (("--epochs", "0"), "--epochs"),
    (("--epochs", "nan"), "--epochs"),
    (("--lr", "-1"), "--lr"),
    (("--lr", "nan"), "--lr"),
    (("--lr", "inf"), "--lr"),
    (("--warmup-steps", "-1"), "--warmup-steps"),
    (("--val-fraction", "5"), "--val-fraction"),
    (("--method", "full", "--lora-r", "16"), "--lora-r"),
    (("--lora-targets", "q_proj", "--method", "full"), "--lora-targets"),
    (("--lora-targets", "bogus_proj"), "--lora-targets"),
    (("--resume", "²"), "--resume"),
    (("--resume", "99"), "no job 99"),
])
def test_submit_finetune_options_are_refused_before_anything_is_queued(store: Path, options: tuple[str, ...],
                                                                       name: str) -> None:
    before = fingerprint(store.parent)
    assert_refused(run(*finetune(store, *options)), 2, name)
    assert fingerprint(store.parent) == before


def test_an_output_under_a_file_is_refused_at_submission(store: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for output in (a_file, a_file / "run"):
        assert_refused(run(*finetune(store, "--output", str(output))), 2, "--output", str(a_file))
    assert run(*finetune(store, "--output", str(tmp_path / "new" / "run"))).exit_code is None  # reaches the cluster
    assert not (tmp_path / "new").exists()


def data_file(tmp_path: Path, text: str, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = json.dumps({"instruction": "Say hi", "output": "Hi"})


@pytest.mark.parametrize(("text", "line", "what"), [
    (json.dumps({"messages": [{"role": ["user"], "content": "a"}, {"role": "assistant", "content": "b"}]}), 1,
     "unknown role a list"),
    (json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": ["gpt"], "value": "y"}]}), 1,
     "unknown speaker a list"),
    (GOOD + "\n" + "[" * 100_000 + "]" * 100_000, 2, "nested too deeply"),
    (GOOD + "\n" + '{"instruction": "a", "output": ' + "9" * 5000 + "}", 2, "a number too long"),
])
def test_malformed_records_are_named_by_file_and_line(store: Path, tmp_path: Path, text: str, line: int,
                                                      what: str) -> None:
    path = data_file(tmp_path, text + "\n")
    assert_refused(run(*finetune(store, data=path)), 2, f"{path}:{line}", what)


def test_a_device_is_not_read_as_a_data_file(store: Path) -> None:
    assert_refused(run(*finetune(store, data=Path("/dev/zero"))), 2, "/dev/zero", "not a regular file")


def test_a_refused_submission_queues_nothing(store: Path) -> None:
    run(*finetune(store, "--lr", "nan"))
    engine = open_store(f"sqlite:///{store}")
    try:
        assert list_jobs(engine, JobFilter(limit=10)) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("dataset_text", ["[" * 100_000, '{"text": ' + "7" * 5000 + "}"])
def test_fit_dataset_that_cannot_be_parsed(tmp_path: Path, dataset_text: str) -> None:
    path = data_file(tmp_path, dataset_text + "\n")
    assert_refused(run("fit", "7B", "--data", str(path)), 2, "--data")

"""Inference jobs end to end on a local Ray instance: plan, Ray actors, SmolLM2, the job record."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ..conftest import TEST_CACHE, run_llmplan

pytest.importorskip("ray")

from llmplan.cli.main import cli  # noqa: E402
from llmplan.planner.plan import InferenceAsk, plan_inference  # noqa: E402
from llmplan.planner.resolve import resolve_model  # noqa: E402
from llmplan.runtime.infer.inference import GenerationSettings  # noqa: E402
from llmplan.runtime.jobs.failures import fail_job  # noqa: E402
from llmplan.runtime.infer.inference_job import (  # noqa: E402
    InferenceInputs,
    answered,
    default_output,
    resume_request,
    run,
    run_recorded,
    submit,
)
from llmplan.runtime.store.opening import open_store  # noqa: E402
from llmplan.runtime.store.repository import JobStatus, get_job, get_job_details, retry_job  # noqa: E402
from llmplan.runtime.store.status import ErrorClass  # noqa: E402

MODEL = "smollm2-135m-instruct"
QUESTION = "Could you tell me the secret code word?"


@pytest.fixture(scope="module")
def local_ray():
    """A private Ray instance for the module; its warm replicas end with it (`ray.shutdown`)."""
    import ray

    from llmplan.runtime.jobs.cluster import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture
def env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`env`, with a warm replica staying loaded for the whole module (not conftest's 30 s): each SmolLM2
    `generate`/`chat` here finds the one an earlier test left on `local_ray` instead of loading the model again
    (the warm path is what users get on a repeated command). On the session's cluster nothing stays: a job's
    driver starts no warm replica, and the test of warm replicas there stops its own."""
    monkeypatch.setenv("LLMPLAN_WARM_SECONDS", "600")
    return {**env, "LLMPLAN_WARM_SECONDS": "600"}


def cpu_plan(model: str = MODEL, replicas: int = 1):
    from dataclasses import replace

    plan = plan_inference(InferenceAsk(model=model, spec=resolve_model(model).spec, batch_size=4,
                                       prompt_len=64, max_new_tokens=8), None)
    return replace(plan, replicas=replicas)


@pytest.mark.slow
def test_generate_records_the_plan_events_and_measurements(local_ray, env) -> None:
    result = CliRunner().invoke(cli, ["generate", MODEL, "The capital of France is", QUESTION, "--max-new-tokens", "8",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "Paris" in data["completions"][0]["text"]  # open text: continued as written
    assert "secret code word" in data["completions"][1]["text"]  # a question: answered in the chat template
    assert "template: the model's chat template for a prompt that ends a sentence" in result.stderr
    assert "empty" not in result.stderr
    engine = open_store(env["LLMPLAN_DB"])
    details = get_job_details(engine, data["job"])
    job = details.job
    assert job.status is JobStatus.SUCCEEDED
    assert job.plan["device"] == "cpu" and job.plan["model_name"] == "SmolLM2-135M-Instruct"
    assert job.measured_tokens_per_s and job.measured_tokens_per_s > 0
    assert [event.to_status for event in details.events] == [JobStatus.QUEUED, JobStatus.SCHEDULED,
                                                            JobStatus.RUNNING, JobStatus.SUCCEEDED]
    written = [json.loads(line) for line in Path(data["output"]).read_text().splitlines()]
    assert written[0]["completion"] == data["completions"][0]["text"]


@pytest.mark.slow
def test_completions_are_written_with_their_index_and_a_resumed_job_answers_only_the_rest(local_ray, env) -> None:
    """Two replicas write each completion with its prompt's index; a job that failed after writing some of them
    (and half a line) is resumed as a new, linked job that answers only the others, on one replica, and appends."""
    engine, jobs_dir = open_store(env["LLMPLAN_DB"]), Path(env["LLMPLAN_JOBS_DIR"])
    prompts = ("The capital of France is", "Water boils at", "One, two, three,", "The sky is", "Cats like")
    inputs = InferenceInputs(items=prompts, settings=GenerationSettings(max_new_tokens=8, batch_size=2))
    plan = cpu_plan(replicas=2)
    whole = run(engine, submit(engine, plan, inputs, name="whole", submitter="test").id, plan, inputs, jobs_dir=jobs_dir)
    assert whole.status is JobStatus.SUCCEEDED, whole.error
    lines = [json.loads(line) for line in Path(whole.output).read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 3, 4]
    assert {line["index"]: line["completion"] for line in lines} == {i: c.text for i, c in enumerate(whole.completions)}

    cut = submit(engine, cpu_plan(), inputs, name="cut", submitter="test")
    kept = [json.dumps(line) for line in lines if line["index"] in (0, 3)]
    default_output(jobs_dir, cut.id).parent.mkdir(parents=True)
    default_output(jobs_dir, cut.id).write_text("\n".join(kept) + '\n{"index": 1, "prompt": "Wat')
    fail_job(engine, cut.id, RuntimeError("the node went away"))
    resumed = retry_job(engine, cut.id, request=resume_request(engine, cut.id, jobs_dir))
    outcome = run_recorded(engine, resumed.id, jobs_dir=jobs_dir)
    assert outcome.status is JobStatus.SUCCEEDED, outcome.error
    assert outcome.output == str(default_output(jobs_dir, cut.id))  # appended to the cut job's output
    written = Path(outcome.output).read_text().splitlines()
    assert written[:2] == kept  # what was answered stays as it was
    new = [json.loads(line) for line in written[3:]]
    assert sorted(line["index"] for line in new) == [1, 2, 4]  # only the missing prompts, each once
    assert all(line["completion"] == whole.completions[line["index"]].text for line in new)
    assert answered(Path(outcome.output)) == {0, 1, 2, 3, 4}
    job = get_job_details(engine, resumed.id)
    assert job.job.retry_of == cut.id
    assert "2 prompts answered before (resumed)" in job.events[-1].message
    assert "tokens/s, first token after" in job.events[-1].message


@pytest.mark.slow
def test_chat_dialogs_from_a_jsonl_file(local_ray, env, tmp_path: Path) -> None:
    dialogs = tmp_path / "dialogs.jsonl"
    dialogs.write_text(json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}]}) + "\n")
    result = CliRunner().invoke(cli, ["generate", MODEL, "--input", str(dialogs), "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    assert "Paris" in json.loads(result.stdout)["completions"][0]["text"]


@pytest.mark.parametrize("command", [["generate", MODEL], ["submit", "infer", "--model", MODEL]])
def test_a_bad_dialog_in_the_input_file_is_refused_with_its_line(env, tmp_path: Path, command: list[str]) -> None:
    dialogs = tmp_path / "dialogs.jsonl"
    dialogs.write_text(json.dumps({"prompt": "Hello"}) + "\n"
                       + json.dumps({"messages": [{"role": "assistant", "content": "Hi"}]}) + "\n")
    result = CliRunner().invoke(cli, [*command, "--input", str(dialogs)])
    assert result.exit_code == 2, result.output
    assert f"{dialogs}:2: message 1 is from the assistant" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback


@pytest.mark.slow
def test_a_model_directory_without_weights_fails_the_job_as_a_user_error(local_ray, env, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text((Path(TEST_CACHE) / "models" / "SmolLM2-135M-Instruct" / "config.json").read_text())
    result = CliRunner().invoke(cli, ["generate", str(broken), "hello", "--max-new-tokens", "4"])
    assert result.exit_code == 1
    assert "failed" in result.output
    engine = open_store(env["LLMPLAN_DB"])
    job = get_job(engine, 1)
    assert job.status is JobStatus.FAILED
    assert job.error_class is ErrorClass.USER_ERROR
    assert "weights" in job.error_message


@pytest.mark.slow
def test_interactive_chat_keeps_the_conversation(local_ray, env) -> None:
    typed = "/model gpt-4\n/system Be concise.\nWhat is the capital of France?\n/reset\n/exit\n"
    result = CliRunner().invoke(cli, ["chat", MODEL, "--max-new-tokens", "20"], input=typed)
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout
    assert "unknown command /model (not sent to the model): /system TEXT sets the system prompt" in result.stderr
    assert "system prompt set to 'Be concise.'; the conversation starts over" in result.stderr
    assert "the conversation starts over (the system prompt is kept)" in result.stderr
    job = get_job(open_store(env["LLMPLAN_DB"]), 1)
    assert job.status is JobStatus.SUCCEEDED and job.name.startswith("chat")
    sent = [json.loads(line)["prompt"] for line in (Path(job.output_dir) / "chat.jsonl").read_text().splitlines()]
    assert sent == [[{"role": "system", "content": "Be concise."},
                     {"role": "user", "content": "What is the capital of France?"}]]  # no /command reached the model


def test_chat_commands_change_the_conversation_and_nothing_else() -> None:
    from llmplan.cli.chat import Conversation, run_command
    from llmplan.runtime.text.chat import Message

    conversation = Conversation(history=[Message("user", "Hi"), Message("assistant", "Hello")])
    assert run_command("/reset", conversation) == "the conversation starts over" and conversation.history == []
    assert run_command("/system  Be brief. ", conversation).startswith("system prompt set to 'Be brief.'")
    assert conversation.dialog("Hi") == [Message("system", "Be brief."), Message("user", "Hi")]
    conversation.history = [Message("user", "Hi"), Message("assistant", "Hello")]
    assert run_command("/systemx", conversation).startswith("unknown command /systemx")
    assert len(conversation.history) == 2 and conversation.system == [Message("system", "Be brief.")]
    assert run_command("/system", conversation) == "system prompt cleared; the conversation starts over"
    assert conversation.system == [] and conversation.history == []
    assert run_command("/exit", conversation) is None and run_command(" /quit ", conversation) is None


def test_generate_asks_an_adapter_in_its_trained_template(
        local_ray, env, tiny_llama: Path, tiny_trained: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from llmplan.runtime.text.data import alpaca_prompt
    from llmplan.runtime.infer.inference import complete, setup

    """The job sends the question in the adapter's Alpaca layout: the prompt's token count is the layout's and
    the completion is the one the hand-written layout gets (--template none: tests/runtime/text/test_prompt_templates)."""
    adapter = str(tiny_trained["lora"])
    result = CliRunner().invoke(cli, ["generate", str(tiny_llama), QUESTION, "--adapter", adapter,
                                      "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    written = json.loads(Path(data["output"]).read_text().splitlines()[0])
    assert data["template"] == "alpaca" and "template: alpaca (trained with it, " in result.stderr
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert written["prompt_tokens"] == len(tokenizer(alpaca_prompt(QUESTION))["input_ids"])
    with setup(tiny_llama, dtype="fp32", device="cpu", adapter=adapter) as generator:
        by_hand = complete(generator, [alpaca_prompt(QUESTION)], GenerationSettings(max_new_tokens=4))[0]
    assert data["completions"][0]["text"] == by_hand.text


def test_an_empty_completion_says_so_and_what_to_try(local_ray, env) -> None:
    raw = CliRunner().invoke(cli, ["generate", MODEL, QUESTION, "--template", "none", "--max-new-tokens", "2"])
    assert raw.exit_code == 0, raw.output
    assert raw.stdout.strip() == ""
    assert ("note: the completion is empty (the model stopped at once): it was sent as raw text; an instruct or "
            "fine-tuned model answers a question in its template: try --template chat (or alpaca), or llmplan chat "
            f"{MODEL}") in raw.stderr


@pytest.mark.slow
def test_submit_queues_the_job_on_the_cluster_and_it_finishes(cluster_env) -> None:
    result = run_llmplan("submit", "infer", "--model", MODEL, "--prompt", "The capital of France is",
                         "--max-new-tokens", "8", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "succeeded"
    completions = Path(data["output_dir"]) / "completions.jsonl"
    assert "Paris" in json.loads(completions.read_text().splitlines()[0])["completion"]


@pytest.mark.slow
def test_a_single_prompt_is_streamed_and_still_measured(local_ray, env) -> None:
    result = CliRunner().invoke(cli, ["generate", MODEL, "The capital of France is", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(" Paris")
    job = get_job(open_store(env["LLMPLAN_DB"]), 1)
    assert job.status is JobStatus.SUCCEEDED
    assert job.measured_tokens_per_s > 0


def test_a_replica_that_takes_a_while_to_load_says_so_and_a_warm_one_says_nothing(local_ray, capsys) -> None:
    import ray

    from llmplan.runtime.infer.ray_inference import LOAD_NOTICE_AFTER_S, loaded

    class SlowToLoad:  # defined here: Ray ships it by value (the test modules are not importable in its workers)
        """An actor whose construction takes `load_s`, like a replica loading its model."""

        def __init__(self, load_s: float) -> None:
            time.sleep(load_s)

        def ready(self) -> str:
            return "ready"

    replica = ray.remote(num_cpus=0)(SlowToLoad).remote(LOAD_NOTICE_AFTER_S + 1.0)
    assert loaded(replica.ready.remote(), "TinyModel", staying_s=600) == "ready"
    starting = capsys.readouterr().err.splitlines()
    assert loaded(replica.ready.remote(), "TinyModel") == "ready"  # loaded already: what a warm replica does
    assert capsys.readouterr().err == ""
    ray.kill(replica)
    assert starting[0] == "loading TinyModel in a Ray actor ..."
    assert re.fullmatch(r"loaded TinyModel \((\d+\.\d) s\); it stays loaded for the next command until 10 min "
                        r"without one", starting[1])
    assert float(re.search(r"\((\d+\.\d) s\)", starting[1]).group(1)) >= LOAD_NOTICE_AFTER_S + 1.0


@pytest.mark.slow
def test_a_second_generate_on_the_same_model_finds_its_replica_warm(cluster_env, monkeypatch) -> None:
    """`generate` leaves its one replica loaded in a named actor; the next `generate` of the model (another
    process) runs on that same actor, without starting or loading anything; both answers are the model's. The
    second runs where torch and transformers cannot be imported: the command itself never needs them (seconds)."""
    monkeypatch.setenv("LLMPLAN_WARM_SECONDS", "300")
    jobs = []
    try:
        for run_llmplan_here in (run_llmplan, run_llmplan_without_the_model_stack):
            done = run_llmplan_here("generate", MODEL, "The capital of France is", "--max-new-tokens", "8", "--json")
            assert done.returncode == 0, done.stderr
            assert "Paris" in json.loads(done.stdout)["completions"][0]["text"]
            jobs.append(json.loads(done.stdout)["job"])
    finally:
        stop_warm_replicas(cluster_env["LLMPLAN_RAY_ADDRESS"])
    engine = open_store(cluster_env["LLMPLAN_DB"])
    first, second = (get_job(engine, job_id) for job_id in jobs)
    assert first.ray_actor_id is not None and second.ray_actor_id == first.ray_actor_id


def run_llmplan_without_the_model_stack(*args: str):
    """`llmplan ARGS` in a process where importing torch or transformers fails (its Ray actors import them)."""
    import os
    import subprocess
    import sys

    code = ("import sys\nsys.modules.update(torch=None, transformers=None)\n"
            "from llmplan.cli.main import main\nsys.argv[0] = 'llmplan'\nmain()\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))


def stop_warm_replicas(address: str) -> None:
    """Kill the cluster's warm replicas (from a process of its own: this one may run another Ray)."""
    import subprocess
    import sys

    code = ("import ray\n"
            "from llmplan.runtime.infer.ray_inference import WARM_PREFIX\n"
            f"ray.init(address={address!r}, log_to_driver=False)\n"
            "for actor in ray.util.list_named_actors(all_namespaces=True):\n"
            "    if actor['name'].startswith(WARM_PREFIX):\n"
            "        ray.kill(ray.get_actor(actor['name'], namespace=actor['namespace']))\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)

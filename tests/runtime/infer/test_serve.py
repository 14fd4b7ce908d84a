"""`llmplan serve` end to end on the CPU: ONE server of SmolLM2 for the whole module, queued on the session's Ray
cluster, asked through the official `openai` client and plain HTTP, listed by `llmplan jobs`, reused by
`llmplan generate`, and stopped by `llmplan cancel` (the last test)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner

pytest.importorskip("ray")
try:
    import openai
except ImportError:  # the test extra installs it; CI must not skip these tests (see `needs_openai`)
    openai = None

from ci_required import unavailable  # noqa: E402
from ..conftest import TEST_CACHE, run_llmplan  # noqa: E402
from ..ray_nodes import free_port  # noqa: E402

from llmplan.cli.main import cli  # noqa: E402
from llmplan.runtime.store.opening import open_store  # noqa: E402
from llmplan.runtime.store.repository import get_job  # noqa: E402

MODEL = "smollm2-135m-instruct"
TOKENS = 4  # every answer is short: the module stays cheap on 2 cores
STATS_WAIT_S = 30


@pytest.fixture(scope="module")
def needs_openai() -> None:
    if openai is None:
        message = "the openai client is not installed (pip install -e '.[test]')"
        unavailable(message, f"CI is set: {message}")


@pytest.fixture(scope="module")
def server(needs_openai, smollm2, ray_head, tmp_path_factory: pytest.TempPathFactory):
    """A running `llmplan serve` job: {"id", "url", "port", "client"}; cancelled after the module if still up."""
    folder = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"LLMPLAN_CACHE": str(TEST_CACHE), "LLMPLAN_JOBS_DIR": str(folder / "jobs"),
                           "LLMPLAN_DB": f"sqlite:///{folder / 'jobs.db'}", "LLMPLAN_RAY_ADDRESS": ray_head.address,
                           "LLMPLAN_WARM_SECONDS": "30"}.items():
            patch.setenv(key, value)
        port = free_port()
        started = run_llmplan("serve", MODEL, "--port", str(port), "--max-new-tokens", "16", "--prompt-len", "128",
                              "--json")
        assert started.returncode == 0, started.stderr
        served = json.loads(started.stdout)
        assert served["status"] == "running" and served["url"] == f"http://127.0.0.1:{port}/v1", served
        client = openai.OpenAI(base_url=served["url"], api_key="unused-on-loopback", max_retries=0, timeout=120)
        yield {**served, "port": port, "client": client}
        if not get_job(open_store(os.environ["LLMPLAN_DB"]), served["id"]).status.is_terminal():
            run_llmplan("cancel", str(served["id"]))  # a test failed before the last one cancelled it


def stats(server) -> dict:
    with urllib.request.urlopen(server["url"].removesuffix("/v1") + "/stats", timeout=10) as response:
        return json.loads(response.read())


def post(server, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(server["url"] + path, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_models_completion_and_chat_through_the_openai_client(server) -> None:
    client = server["client"]
    assert [model.id for model in client.models.list().data] == [MODEL]
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=TOKENS,
                                           temperature=0)
    assert completion.object == "text_completion" and completion.choices[0].text.strip()
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= TOKENS and completion.usage.prompt_tokens > 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                          max_tokens=TOKENS, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content.strip()


@pytest.mark.slow
def test_streams_are_server_sent_events_that_join_to_the_whole_answer(server) -> None:
    client = server["client"]
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=TOKENS, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=TOKENS, temperature=0,
                                                 stream=True))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text = client.completions.create(model=MODEL, prompt="Once upon a", max_tokens=TOKENS, temperature=0)
    pieces = list(client.completions.create(model=MODEL, prompt="Once upon a", max_tokens=TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    chunks = [piece.choices[0] for piece in pieces if piece.choices]
    assert len(chunks) > 1 and "".join(chunk.text for chunk in chunks) == text.choices[0].text
    assert chunks[-1].finish_reason == text.choices[0].finish_reason
    assert pieces[-1].usage.completion_tokens == text.usage.completion_tokens  # the usage chunk comes last


@pytest.mark.slow
def test_concurrent_requests_are_all_answered_in_fewer_batches(server) -> None:
    before = stats(server)
    answers: dict[int, str] = {}

    def ask(index: int) -> None:
        answers[index] = server["client"].completions.create(
            model=MODEL, prompt=f"Item {index} of the list is", max_tokens=TOKENS, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    after = stats(server)
    assert sorted(answers) == [0, 1, 2, 3] and all(answers.values())
    assert after["requests"] - before["requests"] == 4
    assert after["batches"] - before["batches"] < 4  # requests that came while a batch ran went into the next one


@pytest.mark.slow
def test_bad_requests_are_answered_4xx_in_openais_error_shape(server) -> None:
    client = server["client"]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=TOKENS)
    assert unknown.value.body["code"] == "model_not_found" and unknown.value.body["param"] == "model"
    for max_tokens in (0, 17):  # the server was planned for 16
        with pytest.raises(openai.BadRequestError) as out_of_range:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=max_tokens)
        refused = out_of_range.value.body
        assert refused["param"] == "max_tokens" and "between 1 and 16" in refused["message"]
    with pytest.raises(openai.BadRequestError) as too_long:  # SmolLM2's context is 8,192 tokens
        client.completions.create(model=MODEL, prompt="hi " * 9000, max_tokens=TOKENS)
    assert too_long.value.body["param"] == "prompt" and "exceeds the model's context" in too_long.value.body["message"]
    answers = [post(server, "/chat/completions", b'{"model": "' + MODEL.encode() + b'", "messages": [')]
    answers.append(post(server, "/chat/completions", json.dumps({"model": MODEL}).encode()))
    answers.append(post(server, "/chat/completions", json.dumps({"model": MODEL, "messages": [
        {"role": "assistant", "content": "Hi"}]}).encode()))
    answers.append(post(server, "/completions", json.dumps({"model": MODEL, "prompt": "Hi", "n": 2}).encode()))
    answers.append(post(server, "/completions", b"prompt=Hi", "application/x-www-form-urlencoded"))
    statuses = [status for status, _ in answers]
    assert statuses == [400, 400, 400, 400, 415], answers
    for _, body in answers:
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    assert answers[1][1]["error"]["param"] == "messages" and "required" in answers[1][1]["error"]["message"]
    assert "message 1 is from the assistant, expected the user" in answers[2][1]["error"]["message"]


@pytest.mark.slow
def test_jobs_lists_the_server_with_its_address_requests_and_tokens_per_second(server) -> None:
    deadline = time.monotonic() + STATS_WAIT_S
    while True:
        listed = CliRunner().invoke(cli, ["jobs", "--kind", "serve", "--json"])
        assert listed.exit_code == 0, listed.output
        job = json.loads(listed.stdout)[0]
        answered = stats(server)["requests"]
        if f"{answered} requests" in job.get("serving", "") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert job["kind"] == "serve" and job["status"] == "running"
    assert job["serving"].startswith(f"{server['url']}, {answered} requests, ") and job["serving"].endswith("tokens/s")
    table = CliRunner().invoke(cli, ["jobs"], terminal_width=300)
    assert "SERVING" in table.stdout and server["url"] in table.stdout


@pytest.mark.slow
def test_generate_and_chat_answer_through_the_running_server(server) -> None:
    prompt = "The largest planet is"
    direct = server["client"].completions.create(model=MODEL, prompt=prompt, max_tokens=TOKENS, temperature=0)
    before = stats(server)["requests"]
    # In this process: neither starts Ray or loads a model when it finds the server.
    generated = CliRunner().invoke(cli, ["generate", MODEL, prompt, "--max-new-tokens", str(TOKENS), "--json"])
    assert generated.exit_code == 0, generated.output
    assert f"answered by server job {server['id']} at {server['url']}" in generated.stderr
    assert stats(server)["requests"] == before + 1
    assert json.loads(generated.stdout)["completions"][0]["text"] == direct.choices[0].text
    chatted = CliRunner().invoke(cli, ["chat", MODEL, "--max-new-tokens", str(TOKENS)],
                                 input="What is 2+2?\nAnd 3+3?\n/exit\n")
    assert chatted.exit_code == 0, chatted.output
    assert f"answered by server job {server['id']}" in chatted.stderr
    assert stats(server)["requests"] == before + 3  # both turns of the chat


def test_off_loopback_every_call_needs_the_token(needs_openai) -> None:
    """The guard answers before the model is asked: the app alone (no batcher, no model) on a real socket."""
    import uvicorn

    from llmplan.runtime.web.http_guards import listening_socket
    from llmplan.runtime.infer.serve_api import ServeConfig, create_app, token_digest

    listener = listening_socket("0.0.0.0", 0)
    port = listener.getsockname()[1]
    config = ServeConfig(model_id=MODEL, host="0.0.0.0", port=port, token_sha256=token_digest("s3cret"))
    app = create_app(config, batcher=None, template=None)  # type: ignore[arg-type]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/v1"
        for header in ({"Authorization": "Bearer wrong"}, {}):
            request = urllib.request.Request(url + "/models", headers=header)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401
            assert json.loads(refused.value.read())["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0) as client:
            assert [model.id for model in client.models.list().data] == [MODEL]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.slow
def test_cancel_stops_the_server_and_frees_its_port(server) -> None:
    cancelled = run_llmplan("cancel", str(server["id"]), "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    deadline = time.monotonic() + 60
    while not port_is_free(server["port"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert port_is_free(server["port"])
    with pytest.raises(openai.APIConnectionError):
        server["client"].models.list()


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

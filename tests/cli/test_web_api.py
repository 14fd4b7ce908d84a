"""The dashboard's JSON API against a real server on loopback, with a real SQLite job store."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path
from urllib.error import HTTPError

import pytest

from llmplan.cli.web_api import make_config, serve
from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.repository import JobKind, JobSpec, JobStatus, create_job, get_job, transition

EXAMPLE_DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "alpaca_llmplan.jsonl"


def call(base: str, path: str, body: dict | None = None, *, headers: dict | None = None,
         content_type: str = "application/json") -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method="GET" if body is None else "POST",
                                     headers={**({"Content-Type": content_type} if body is not None else {}),
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The one folder the dashboard may use, holding the example data set as train.jsonl."""
    folder = tmp_path / "root"
    folder.mkdir()
    shutil.copyfile(EXAMPLE_DATA, folder / "train.jsonl")
    return folder


@pytest.fixture
def api(store: str, root: Path):
    server = serve(make_config(store, "127.0.0.1", 0, None, (root,)))
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()


def finetune(root: Path, **fields: object) -> dict:
    """A submission of SmolLM2 fine-tuning on the root's data, with `fields` changed (keys: the spec's, with _)."""
    spec = {"task": "finetune", "model": "smollm2-135m-instruct", "data": str(root / "train.jsonl"), "max-steps": 4}
    return {**spec, **{key.replace("_", "-"): value for key, value in fields.items()}}


def queued_job(store: str, model: str = "Llama-2-7B") -> int:
    engine = open_store(store)
    try:
        return create_job(engine, JobSpec(name="t", kind=JobKind.FINETUNE, model=model, submitter="t", request={})).id
    finally:
        engine.dispose()


def test_plan_for_a_catalog_model_lists_ranked_candidates_with_their_memory(api: str) -> None:
    status, plan = call(api, "/api/plan", {"model": "7B", "gpu": "A100-80GB", "gpus": 1, "task": "finetune"})
    assert status == 200, plan
    assert plan["model"]["name"] == "Llama-2-7B" and plan["feasible"] is True
    first = plan["candidates"][0]
    assert 0 < first["memory_bytes"] <= plan["budget_bytes"] and first["breakdown"]
    assert plan["recommendation"]["command"].startswith("llmplan submit finetune")
    job = first["job"]  # the submit form's start: the candidate as a job spec, with no data path yet
    assert job["task"] == "finetune" and job["model"] == "PATH/TO/Llama-2-7B" and "data" not in job  # no weights here
    assert (job["method"], job["micro-batch"], job["grad-accum"]) == (first["method"], first["micro_batch"],
                                                                      first["grad_accum"])


def test_bad_plan_input_is_one_line_not_a_trace(api: str) -> None:
    assert call(api, "/api/plan", {"model": "Llama-9000"})[0] == 400
    status, answer = call(api, "/api/plan", {"model": "x" * 300})  # longer than a file name may be
    assert status == 400 and "unknown model" in answer["error"]
    status, answer = call(api, "/api/plan", {"model": "7B", "learning_rate": 1})
    assert (status, answer["error"]) == (400, "unknown field(s): learning_rate")
    status, answer = call(api, "/api/plan", {"model": "7B", "seq_len": "long"})
    assert status == 400 and "bad field value" in answer["error"]
    status, answer = call(api, "/api/plan")  # a link or a typed address: says how to ask
    assert (status, answer["error"]) == (405, "GET /api/plan is not a call: use POST with a JSON body")


def test_jobs_list_detail_and_cancel(api: str, store: str) -> None:
    first, second = queued_job(store), queued_job(store, "Qwen2.5-7B")
    status, jobs = call(api, "/api/jobs?model=qwen")
    assert status == 200 and [job["id"] for job in jobs] == [second]
    status, detail = call(api, f"/api/jobs/{first}")
    assert status == 200 and detail["job"]["status"] == "queued" and detail["events"][0]["to_status"] == "queued"
    status, answer = call(api, f"/api/jobs/{first}/cancel", {})
    assert (status, answer) == (200, {"id": first, "status": "cancelled"})
    engine = open_store(store)
    assert get_job(engine, first).status is JobStatus.CANCELLED
    engine.dispose()
    assert call(api, f"/api/jobs/{first}/cancel", {})[0] == 409
    assert call(api, "/api/jobs/999")[0] == 404
    assert call(api, "/api/jobs?status=sleeping")[0] == 400


def test_a_log_is_read_from_an_offset(api: str, store: str, tmp_path: Path) -> None:
    from llmplan.runtime.store.repository import Artifacts, JobUpdate, update_job

    job_id = queued_job(store)
    log = tmp_path / "log.txt"
    log.write_text("one\ntwo\n")
    engine = open_store(store)
    update_job(engine, job_id, JobUpdate(artifacts=Artifacts(log_path=str(log))))
    status, chunk = call(api, f"/api/jobs/{job_id}/log?offset=4")
    assert (status, chunk) == (200, {"text": "two\n", "offset": 8, "ended": False})
    transition(engine, job_id, JobStatus.CANCELLED)
    engine.dispose()
    assert call(api, f"/api/jobs/{job_id}/log?offset=8")[1] == {"text": "", "offset": 8, "ended": True}


def test_state_changes_need_a_json_body_from_the_same_origin(api: str, store: str) -> None:
    job_id = queued_job(store)
    assert call(api, f"/api/jobs/{job_id}/cancel", {}, content_type="application/x-www-form-urlencoded")[0] == 415
    status, answer = call(api, f"/api/jobs/{job_id}/cancel", {}, headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-site" in answer["error"]
    engine = open_store(store)
    assert get_job(engine, job_id).status is JobStatus.QUEUED
    engine.dispose()
    assert call(api, f"/api/jobs/{job_id}/cancel", {}, headers={"Origin": api})[0] == 200


def test_off_loopback_every_call_needs_the_token(store: str) -> None:
    config = make_config(store, "0.0.0.0", 0, None, (Path.cwd(),))
    assert config.needs_token and len(config.token) >= 24
    server = serve(config)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, answer = call(base, "/api/health")
        assert status == 401 and "token" in answer["error"]
        assert call(base, "/api/health", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(base, "/api/health", headers={"Authorization": "Bearer jetón-été"})[0] == 401  # not ASCII
        assert call(base, "/api/health", headers={"Authorization": f"Bearer {config.token}"}) == (200, {"ok": True})
    finally:
        server.shutdown()


# ---- DNS rebinding: only the names the server was started for ---------------------------------------------
def test_a_forged_host_is_refused_even_with_a_matching_origin(api: str, store: str) -> None:
    job_id = queued_job(store)
    port = api.rsplit(":", 1)[1]
    forged = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    status, answer = call(api, "/api/jobs", headers=forged)
    assert status in (403, 421) and "Host" in answer["error"]
    assert call(api, f"/api/jobs/{job_id}/cancel", {}, headers=forged)[0] in (403, 421)
    assert call(api, f"/api/jobs/{job_id}/cancel", {}, headers={"Host": f"127.0.0.1:{int(port) + 1}"})[0] in (403, 421)
    engine = open_store(store)
    assert get_job(engine, job_id).status is JobStatus.QUEUED
    engine.dispose()
    for name in ("localhost", "127.0.0.1", "[::1]"):
        assert call(api, "/api/jobs", headers={"Host": f"{name}:{port}"})[0] == 200
    assert call(api, f"/api/jobs/{job_id}/cancel", {}, headers={"Host": f"localhost:{port}",
                                                                "Origin": f"http://localhost:{port}"})[0] == 200


# ---- paths the plan form names ----------------------------------------------------------------------------
TINY_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "vocab_size": 1000}


def test_a_plan_reads_models_inside_the_roots_only_and_never_tells_what_exists_outside(
        api: str, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside-model"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps(TINY_CONFIG))
    answers = [call(api, "/api/plan", {"model": model, "gpu": "A100-80GB"})
               for model in (str(outside), str(outside / "config.json"), str(tmp_path / "missing"), "/root")]
    for status, answer in answers:
        assert (status, answer.get("field")) == (400, "model") and "outside the folders" in answer["error"], answer
    assert len({answer["error"].split(" is outside")[1] for _, answer in answers}) == 1  # the same words for all
    inside = root / "tiny"
    inside.mkdir()
    (inside / "config.json").write_text(json.dumps(TINY_CONFIG))
    status, plan = call(api, "/api/plan", {"model": str(inside), "gpu": "A100-80GB"})
    assert status == 200 and plan["model"]["name"] == "tiny", plan


def test_an_inference_output_never_overwrites_a_file(api: str, root: Path) -> None:
    existing = root / "answers.jsonl"
    existing.write_text("keep me\n")
    spec = {"task": "infer", "model": "smollm2-135m-instruct", "prompt": ["Hi"], "output": str(existing)}
    field, error = refused(api, spec)
    assert field == "output" and "already exists" in error
    assert existing.read_text() == "keep me\n" and call(api, "/api/jobs")[1] == []


# ---- robustness: bad requests are 4xx, connections cannot pin the server ------------------------------------
def raw_request(base: str, request: bytes, timeout: float = 10) -> bytes:
    """The server's whole answer to `request`, sent as is on a fresh connection."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def posted(base: str, path: str, body: bytes, content_length: str | None = None) -> bytes:
    host = base.removeprefix("http://")
    length = str(len(body)) if content_length is None else content_length
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode() + body


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_malformed_bodies_and_numbers_are_bad_requests(api: str, root: Path) -> None:
    assert status_of(raw_request(api, posted(api, "/api/plan", b'{"model": "7B"}', content_length="-1"))) == 400
    deep = b"[" * 100_000 + b"]" * 100_000
    assert status_of(raw_request(api, posted(api, "/api/plan", deep))) == 400
    huge = "9" * 5000
    assert status_of(raw_request(api, posted(api, "/api/plan", b'{"model": "7B", "gpus": %s}' % huge.encode()))) == 400
    spec = json.dumps(finetune(root, max_steps=0)).replace('"max-steps": 0', f'"max-steps": {huge}').encode()
    assert status_of(raw_request(api, posted(api, "/api/jobs", spec))) == 400
    status, answer = call(api, "/api/jobs", finetune(root, lr=float("nan")))
    assert status == 400 and "NaN" in answer["error"]
    assert call(api, f"/api/jobs/{huge}")[0] == 400
    assert call(api, "/api/jobs/99999999999999999999999/log?offset=1")[0] == 400
    assert call(api, "/api/jobs?limit=-1")[0] == 400
    assert call(api, "/api/jobs")[1] == []


def test_half_open_connections_hold_no_thread_and_are_closed(store: str, root: Path) -> None:
    server = serve(replace(make_config(store, "127.0.0.1", 0, None, (root,)), idle_timeout_s=1))
    base = "http://%s:%d" % server.server_address
    threads_before = threading.active_count()
    connections = []
    try:
        for _ in range(300):  # each starts a request and never finishes it
            connection = socket.create_connection(server.server_address, timeout=10)
            connection.sendall(b"GET /api/health HTTP/1.1\r\nHost: " + base[7:].encode() + b"\r\n")
            connections.append(connection)
        assert call(base, "/api/health") == (200, {"ok": True})
        assert threading.active_count() <= threads_before + 4
        closed = sum(1 for connection in connections if connection.recv(1024) == b"")  # the server hangs up
        assert closed == len(connections)
    finally:
        for connection in connections:
            connection.close()
        server.shutdown()


def test_the_page_is_served_at_the_root_and_calls_only_the_api(api: str) -> None:
    with urllib.request.urlopen(api + "/", timeout=30) as response:
        assert response.headers.get_content_type() == "text/html"
        page = response.read().decode()
    assert '<form id="plan-form">' in page and 'fetch(path' in page
    assert "http://" not in page.split("<script>")[1] and "https://" not in page  # no outside assets or calls


def test_the_submit_forms_menus_are_the_submit_commands_choices(api: str) -> None:
    status, menus = call(api, "/api/choices")
    assert status == 200 and menus["finetune"]["method"] == ["auto", "full", "lora", "qlora"]
    assert "fp32" in menus["finetune"]["precision"] and menus["infer"]["quant"] == ["none", "int8", "nf4"]


# ---- submissions refused before anything is planned or queued (no Ray cluster is joined) ------------------
def refused(api: str, spec: dict) -> tuple[str | None, str]:
    status, answer = call(api, "/api/jobs", spec)
    assert status == 400, answer
    return answer.get("field"), answer["error"]


def test_submitted_paths_must_resolve_inside_the_roots(api: str, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.jsonl"
    shutil.copyfile(EXAMPLE_DATA, outside)
    (root / "link.jsonl").symlink_to(outside)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    field, error = refused(api, finetune(root, data=str(outside)))
    assert field == "data" and "outside the folders" in error and str(root) in error
    assert refused(api, finetune(root, data=str(root / "link.jsonl")))[0] == "data"  # the link's target counts
    assert refused(api, finetune(root, data=str(root / ".." / "outside.jsonl")))[0] == "data"
    assert refused(api, finetune(root, output=str(tmp_path / "out")))[0] == "output"
    assert refused(api, finetune(root, model=str(tmp_path / "model")))[0] == "model"
    assert refused(api, finetune(root, data=[str(root / "train.jsonl"), str(outside)])) == ("data", "data: give one path")
    assert call(api, "/api/jobs")[1] == []


def test_a_missing_file_or_an_unknown_model_is_refused_in_its_field(api: str, root: Path) -> None:
    field, error = refused(api, finetune(root, data=str(root / "missing.jsonl")))
    assert field == "data" and "no such file" in error
    field, error = refused(api, finetune(root, model="Llama-9000"))
    assert field == "model" and "unknown model" in error
    field, error = refused(api, {"task": "infer", "model": "smollm2-135m-instruct", "input": str(root / "none.jsonl")})
    assert field == "input" and "no such file" in error


def test_bad_values_are_refused_by_the_submit_commands_own_options(api: str, root: Path) -> None:
    assert refused(api, finetune(root, micro_batch="four"))[0] == "micro-batch"
    assert refused(api, finetune(root, max_steps=0)) == ("max-steps", "--max-steps must be positive, got 0")
    assert refused(api, finetune(root, method="dora"))[0] == "method"
    assert refused(api, finetune(root, model=None))[0] == "model"
    field, error = refused(api, finetune(root, wait=True))  # steers the submitting process, not the job
    assert field is None and "unknown key(s) wait" in error
    # A value is never read as an option of its own (the spec's words are --key=value).
    assert refused(api, finetune(root, packing="--db=sqlite:///elsewhere.db"))[0] == "packing"
    broken = root / "broken.jsonl"
    broken.write_text(EXAMPLE_DATA.read_text().splitlines()[0] + '\n{"instruction": "Say hi", "output": ""}\n')
    field, error = refused(api, finetune(root, data=str(broken)))
    assert field == "data" and f"{broken}:2: field output" in error
    assert call(api, "/api/jobs")[1] == []


# ---- data-set preview --------------------------------------------------------------------------------------
def test_data_preview_names_the_format_counts_the_records_and_shows_the_first_rows(api: str, root: Path) -> None:
    status, preview = call(api, "/api/data/preview", {"path": str(root / "train.jsonl")})
    assert status == 200, preview
    first = json.loads(EXAMPLE_DATA.read_text().splitlines()[0])
    assert preview["format"] == "alpaca" and preview["records"] == len(EXAMPLE_DATA.read_text().splitlines())
    assert preview["rows"][0] == [{"role": "user", "content": first["instruction"]},
                                  {"role": "assistant", "content": first["output"]}]
    tokens = preview["tokens"]
    assert 1 <= tokens["min"] <= tokens["median"] <= tokens["max"] and "approximated" in tokens["counted_by"]


def test_data_preview_counts_tokens_with_a_local_models_tokenizer(api: str, root: Path) -> None:
    from transformers import AutoTokenizer

    from llmplan.runtime.models.model_store import ensure_model
    from tests.runtime.conftest import TEST_CACHE

    model = root / "smollm2"
    model.mkdir()
    source = Path(ensure_model("smollm2-135m-instruct", cache=TEST_CACHE).path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, model / name)
    (root / "one.jsonl").write_text(json.dumps({"instruction": "Say hi.", "output": "Hi there!"}) + "\n")
    status, preview = call(api, "/api/data/preview", {"path": str(root / "one.jsonl"), "model": str(model)})
    assert status == 200, preview
    expected = len(AutoTokenizer.from_pretrained(model)("Say hi.\nHi there!", add_special_tokens=False)["input_ids"])
    assert preview["tokens"] == {"min": expected, "median": expected, "max": expected,
                                 "counted_by": f"the tokenizer of {model}"}


def test_data_preview_of_a_bad_file_names_its_line_and_paths_stay_in_the_root(api: str, root: Path) -> None:
    good = json.dumps({"instruction": "a", "output": "b"})
    (root / "bad.jsonl").write_text(f"{good}\n{good}\n{{\"instruction\": \"c\"}}\n")
    status, answer = call(api, "/api/data/preview", {"path": str(root / "bad.jsonl")})
    assert status == 400 and answer["error"].startswith(f"{root / 'bad.jsonl'}:3: ") and answer["field"] == "data"
    status, answer = call(api, "/api/data/preview", {"path": "/etc/hostname"})
    assert status == 400 and "outside the folders" in answer["error"], answer


# ---- merging a finished job's adapter ------------------------------------------------------------------------------
def succeeded_lora_job(store: str, model: Path, adapter: Path) -> int:
    from llmplan.runtime.store.repository import Artifacts, JobUpdate

    engine = open_store(store)
    try:
        job_id = queued_job(store, model=str(model))
        for status in (JobStatus.SCHEDULED, JobStatus.RUNNING):
            transition(engine, job_id, status)
        transition(engine, job_id, JobStatus.SUCCEEDED, update=JobUpdate(artifacts=Artifacts(adapter_path=str(adapter))))
        return job_id
    finally:
        engine.dispose()


def test_a_succeeded_lora_jobs_adapter_is_merged_into_a_new_folder_in_the_root(api: str, store: str, root: Path,
                                                                               tmp_path: Path) -> None:
    import torch
    import transformers

    from tests.runtime.infer.test_inference import save_lora_adapter, save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny")
    adapter = save_lora_adapter(model, tmp_path / "adapter")
    job_id = succeeded_lora_job(store, model, adapter)
    assert call(api, f"/api/jobs/{queued_job(store)}/merge", {"output": str(root / "m")})[0] == 409
    status, answer = call(api, f"/api/jobs/{job_id}/merge", {"output": str(root / "merged")})
    assert (status, answer) == (200, {"id": job_id, "output": str(root / "merged")}), answer
    merged = transformers.AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[weight], base.state_dict()[weight])  # the adapter is folded in
    status, answer = call(api, f"/api/jobs/{job_id}/merge", {"output": str(root / "merged")})
    assert status == 400 and "already exists" in answer["error"] and answer["field"] == "output"
    status, answer = call(api, f"/api/jobs/{job_id}/merge", {"output": str(tmp_path / "elsewhere")})
    assert status == 400 and "outside the folders" in answer["error"]


# ---- chat ---------------------------------------------------------------------------------------------------------
def test_chat_checks_its_turn_and_answers_503_while_the_ray_cluster_is_down(store: str, root: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on: the cluster is down
        probe.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{probe.getsockname()[1]}"
    server = serve(make_config(store, "127.0.0.1", 0, None, (root,), address=down))
    api = "http://{}:{}".format(*server.server_address[:2])
    try:
        turn = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}
        status, answer = call(api, "/api/chat", turn)
        assert status == 503 and f"the Ray cluster at {down} is unreachable" in answer["error"], answer
        status, answer = call(api, "/api/chat", {**turn, "messages": [{"role": "assistant", "content": "Hi"}]})
        assert status == 400 and answer["field"] == "messages", answer
        status, answer = call(api, "/api/chat", {**turn, "messages": []})
        assert status == 400 and "empty" in answer["error"], answer
        status, answer = call(api, "/api/chat", {**turn, "adapter": "/etc"})
        assert status == 400 and "outside the folders" in answer["error"], answer
        status, answer = call(api, "/api/chat", {"job": queued_job(store), "messages": turn["messages"]})
        assert status == 409 and "only a succeeded LoRA" in answer["error"], answer
    finally:
        server.shutdown()

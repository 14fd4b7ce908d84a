"""The dashboard's JSON API against a real server on loopback, with a real SQLite job store."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from urllib.error import HTTPError

import pytest

from llmplan.cli.web_api import make_config, serve
from llmplan.runtime.store.db import open_store
from llmplan.runtime.store.repository import JobKind, JobSpec, JobStatus, create_job, get_job, transition


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
def api(store: str):
    server = serve(make_config(store, "127.0.0.1", 0, None, (Path.cwd(),)))
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()


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


def test_bad_plan_input_is_one_line_not_a_trace(api: str) -> None:
    assert call(api, "/api/plan", {"model": "Llama-9000"})[0] == 400
    status, answer = call(api, "/api/plan", {"model": "7B", "learning_rate": 1})
    assert (status, answer["error"]) == (400, "unknown field(s): learning_rate")
    status, answer = call(api, "/api/plan", {"model": "7B", "seq_len": "long"})
    assert status == 400 and "bad field value" in answer["error"]


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
        assert call(base, "/api/health", headers={"Authorization": f"Bearer {config.token}"}) == (200, {"ok": True})
    finally:
        server.shutdown()


def test_the_page_is_served_at_the_root_and_calls_only_the_api(api: str) -> None:
    with urllib.request.urlopen(api + "/", timeout=30) as response:
        assert response.headers.get_content_type() == "text/html"
        page = response.read().decode()
    assert '<form id="plan-form">' in page and 'fetch(path' in page
    assert "http://" not in page.split("<script>")[1] and "https://" not in page  # no outside assets or calls

"""The rule of #12 for the dashboard's JSON API, with generated input: every call answers 2xx, or a 4xx JSON
{"error": one line, "field"?} saying what is wrong (503 only for a cluster that cannot be reached), never a 5xx
from a bug, and a refused submission leaves the job store as it was. A real server on loopback, a real SQLite
store, and a Ray address where nothing listens (a submission that passes every check stops there: 503)."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import urllib.request
from pathlib import Path
from urllib.error import HTTPError

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmplan.cli.web_api import make_config, serve
from llmplan.runtime.store.opening import open_store
from llmplan.runtime.store.repository import JobFilter, list_jobs

EXAMPLE_DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "alpaca_llmplan.jsonl"
EXAMPLES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

VALUES = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", " ", "nan", "-inf", "1e23", "²", "٣", "１", "9" * 5000, "24GiB", "--gpus=2", "../../etc",
                     "/root", "\x00", "all-linear", "lora", "qlora", "full", "infer", "bogus"]),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
PLAN_FIELDS = ["model", "gpus", "gpu", "gpu_mem", "task", "method", "seq_len", "batch_size", "prompt_len",
               "max_new_tokens", "margin", "top", "unknown"]
SPEC_KEYS = ["model", "data", "seq-len", "batch-size", "micro-batch", "workers", "lora-r", "lora-targets", "epochs",
             "max-steps", "lr", "warmup-steps", "val-fraction", "priority", "output", "method", "precision", "task",
             "db", "resume"]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when this returns: nothing listens there


@pytest.fixture(scope="module")
def dashboard():
    folder = Path(tempfile.mkdtemp(prefix="llmplan-api-property-"))
    root = folder / "root"
    root.mkdir()
    shutil.copyfile(EXAMPLE_DATA, root / "train.jsonl")
    store = f"sqlite:///{folder / 'jobs.db'}"
    server = serve(make_config(store, "127.0.0.1", 0, None, (root,), address=f"127.0.0.1:{closed_port()}"))
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}", store, root
    server.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


def post(base: str, path: str, body: object) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except HTTPError as error:
        return error.code, json.loads(error.read())


def job_count(store: str) -> int:
    engine = open_store(store)
    try:
        return len(list_jobs(engine, JobFilter(limit=10_000)))
    finally:
        engine.dispose()


def assert_the_rule(status: int, document: dict, *, ray_may_answer: bool) -> None:
    assert status < 500 or (ray_may_answer and status == 503), (status, document)
    if status >= 400:
        message = document["error"]
        assert isinstance(message, str) and message and "\n" not in message, document
        assert "Traceback" not in message and "internal error" not in message, document


@EXAMPLES
@given(field=st.sampled_from(PLAN_FIELDS), value=VALUES)
def test_the_plan_api_answers_any_field_value_by_the_rule(dashboard, field: str, value: object) -> None:
    base, _, _ = dashboard
    body = {"model": "7B", "gpu": "A100-80GB", "gpus": 1, field: value}
    status, document = post(base, "/api/plan", body)
    assert_the_rule(status, document, ray_may_answer=False)
    if status >= 400 and document.get("field") is not None:
        assert document["field"] in {*PLAN_FIELDS, "model", "body"} or document["field"].replace("-", "_") in body


@EXAMPLES
@given(key=st.sampled_from(SPEC_KEYS), value=VALUES)
def test_a_submission_with_any_value_is_refused_by_the_rule_and_changes_nothing(dashboard, key: str,
                                                                              value: object) -> None:
    base, store, root = dashboard
    spec = {"task": "finetune", "model": "smollm2-135m-instruct", "data": str(root / "train.jsonl"),
            "max-steps": 2, key: value}
    before, files = job_count(store), sorted(p.name for p in root.iterdir())
    status, document = post(base, "/api/jobs", spec)
    assert_the_rule(status, document, ray_may_answer=True)
    assert status != 200 or "id" in document
    if status >= 400:
        assert job_count(store) == before
        assert sorted(p.name for p in root.iterdir()) == files

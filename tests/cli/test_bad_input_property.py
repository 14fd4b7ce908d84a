"""The rule of #12, for generated input: every command succeeds, or prints one line on stderr naming the option
or file:line at fault and exits 2 (or 1), with no traceback and nothing changed in the store or on disk.

Generated: option values (huge, negative, NaN, inf, non-ASCII digits, empty, text) for `estimate`, `fit`,
`submit finetune`, `show` and `jobs`, and data-file lines for `submit finetune` and `fit --data`. Submissions
run on a real SQLite store and stop where they would join the Ray cluster (see bad_input.py)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmplan.runtime.store.opening import open_store

from bad_input import EXAMPLE_DATA, Outcome, fingerprint, run

EXAMPLES = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NUMBER_TEXT = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "nan", "-inf", "inf", "1e23", "1e8", "0", "-1", "²", "٣", "１", "0x10", "1_000",
                     "9" * 5000, "1" * 400 + "GiB", "24GiB", "--", "\x00", "\n", "#1", "1.5"]),
    st.text(alphabet=st.characters(categories=["Nd", "No", "Po", "Zs", "Ll"]), max_size=8),
)

ESTIMATE_OPTIONS = ["--batch-size", "--seq-len", "--lora-r", "--gpus", "--zero", "--lora-targets", "--precision"]
FIT_OPTIONS = ["--gpus", "--gpu-mem", "--seq-len", "--batch-size", "--tokens", "--epochs", "--margin", "--top",
               "--lora-r", "--lora-targets", "--prompt-len", "--max-new-tokens"]
SUBMIT_OPTIONS = ["--seq-len", "--batch-size", "--micro-batch", "--grad-accum", "--workers", "--lora-r", "--epochs",
                  "--max-steps", "--lr", "--warmup-steps", "--save-every", "--seed", "--val-fraction", "--priority",
                  "--output", "--resume", "--lora-targets", "--max-retries"]
JOBS_OPTIONS = ["--limit", "--since", "--status", "--kind", "--model"]


def assert_the_rule(outcome: Outcome, *, named: str) -> None:
    """Success, or exit 1/2 with one 'Error: ...' line naming `named` or another option; never a traceback."""
    assert outcome.exit_code in (0, 1, 2), outcome.exit_code
    assert "Traceback" not in outcome.output
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("Error")]
    if outcome.exit_code == 2:
        assert len(outcome.stderr.strip().splitlines()) == 1 and len(errors) == 1, outcome.stderr
    for line in errors:
        assert "internal error" not in line, line  # the last resort must never be what answers bad input
        assert named.lower() in line.lower() or re.search(r"--[a-z]|JOB|MODEL", line), (named, line)


def new_store(folder: Path) -> Path:
    path = folder / "store" / "jobs.db"
    path.parent.mkdir(parents=True)
    open_store(f"sqlite:///{path}").dispose()
    return path


@EXAMPLES
@given(option=st.sampled_from(ESTIMATE_OPTIONS), value=NUMBER_TEXT)
def test_estimate(option: str, value: str) -> None:
    assert_the_rule(run("estimate", "7B", option, value), named=option)


@EXAMPLES
@given(option=st.sampled_from(FIT_OPTIONS), value=NUMBER_TEXT)
def test_fit(option: str, value: str) -> None:
    assert_the_rule(run("fit", "7B", "--gpu", "A100-80GB", option, value, "--json"), named=option)


@EXAMPLES
@given(option=st.sampled_from(SUBMIT_OPTIONS), value=NUMBER_TEXT)
def test_submit_finetune_options(option: str, value: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = new_store(Path(folder))
        before = fingerprint(Path(folder))
        outcome = run("submit", "finetune", "--model", "smollm2-135m-instruct", "--data", str(EXAMPLE_DATA),
                      "--db", str(store), option, value)
        if outcome.exit_code is not None:  # refused before the cluster: nothing queued, nothing written
            assert_the_rule(outcome, named=option)
            assert outcome.exit_code != 0
            assert fingerprint(Path(folder)) == before


@EXAMPLES
@given(job=NUMBER_TEXT, option=st.sampled_from(JOBS_OPTIONS), value=NUMBER_TEXT)
def test_show_and_jobs(job: str, option: str, value: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = new_store(Path(folder))
        before = fingerprint(Path(folder))
        assert_the_rule(run("show", "--db", str(store), "--", job), named="job")
        assert_the_rule(run("jobs", "--db", str(store), option, value), named=option)
        assert fingerprint(Path(folder)) == before


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["instruction", "input", "output", "messages", "role", "content", "conversations", "from",
                         "value", "system", "x"]), inner, max_size=4),
    max_leaves=12,
)
DATA_LINES = st.lists(st.one_of(
    JSON_VALUES.map(json.dumps),
    st.sampled_from(["[" * 5000, '{"instruction": "a", "output": ' + "9" * 5000 + "}", "", "\x00", "{", "]",
                     json.dumps({"messages": [{"role": ["user"], "content": "a"}]})]),
    st.text(max_size=20).filter(lambda text: "\n" not in text and "\r" not in text),
), min_size=1, max_size=4)


@EXAMPLES
@given(lines=DATA_LINES)
def test_data_files(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = new_store(Path(folder))
        data = Path(folder) / "data.jsonl"
        data.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        before = fingerprint(Path(folder))
        outcome = run("submit", "finetune", "--model", "smollm2-135m-instruct", "--data", str(data),
                      "--db", str(store))
        if outcome.exit_code is not None:
            assert_the_rule(outcome, named=str(data))
            assert fingerprint(Path(folder)) == before
        assert_the_rule(run("fit", "7B", "--gpu", "A100-80GB", "--data", str(data), "--json"), named="--data")

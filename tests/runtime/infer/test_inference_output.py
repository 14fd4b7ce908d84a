"""A batch job's output file without Ray: lines with their prompt's index, what a resumed job still has to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from llmplan.runtime.infer.inference import Completion, FinishReason  # noqa: E402
from llmplan.runtime.infer.inference_job import CompletionSink, remaining, success_message  # noqa: E402

ITEMS = ("a", "b", "c", "d")


def completion(text: str) -> Completion:
    return Completion(text, (1, 2, 3), 4, FinishReason.LENGTH)


def test_completions_are_written_as_they_come_with_their_index(tmp_path: Path) -> None:
    output = tmp_path / "job" / "completions.jsonl"
    with CompletionSink(output, ITEMS, append=False, total=4) as sink:
        sink.add(2, completion("third"))
        assert json.loads(output.read_text())["index"] == 2  # on disk before the next one finishes
        sink.add(0, completion("first"))
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(line["index"], line["prompt"], line["completion"]) for line in lines] == [(2, "c", "third"),
                                                                                      (0, "a", "first")]
    assert [c.text for c in sink.in_order()] == ["first", "third"]
    assert remaining(output, 4) == [1, 3]


def test_a_resumed_sink_appends_and_a_cut_off_line_counts_as_unanswered(tmp_path: Path) -> None:
    output = tmp_path / "completions.jsonl"
    output.write_text(json.dumps({"index": 1, "completion": "x"}) + "\n" + '{"index": 3, "compl')
    assert remaining(output, 4) == [0, 2, 3]
    assert remaining(tmp_path / "none.jsonl", 2) == [0, 1]
    with CompletionSink(output, ITEMS, append=True, total=3) as sink:
        sink.add(0, completion("zero"))
    assert output.read_text().startswith(json.dumps({"index": 1, "completion": "x"}))
    assert remaining(output, 4) == [2, 3]


def test_the_finished_job_says_its_speed_and_time_to_first_token() -> None:
    assert success_message(4, 12, 8123.4, 0.25, 2, Path("out.jsonl")) == (
        "4 completions, 12 tokens, 8,123 tokens/s, first token after 0.25 s, 2 prompts answered before (resumed)"
        " -> out.jsonl")

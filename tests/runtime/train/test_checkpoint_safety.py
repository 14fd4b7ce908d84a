"""Resume never unpickles code: a pickle planted in a checkpoint folder is refused and runs nothing (#12.6)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from llmplan.runtime.train.distributed import OPTIMIZER_FILE, UnsafeCheckpoint, load_state  # noqa: E402
from llmplan.runtime.train.train import cleanup, latest_checkpoint, setup, train  # noqa: E402
from llmplan.runtime.train.train_config import STATE_FILE  # noqa: E402

from .test_train import tiny_config  # noqa: E402


class Payload:
    """What an attacker plants: unpickling it calls os.system, which writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"step": 1, "payload": Payload(marker)}, protocol=2))  # torch.save's protocol


def test_a_planted_pickle_is_refused_by_the_checkpoint_reader(tmp_path: Path) -> None:
    marker, planted = tmp_path / "ran", tmp_path / "state.pt"
    plant(planted, marker)
    with pytest.raises(UnsafeCheckpoint, match=r"state.pt is not a checkpoint llmplan wrote \(.*GLOBAL posix.system"):
        load_state(planted)
    assert not marker.exists()
    torch.save({"step": 3, "rng": (1, [2, 3], None), "weights": torch.ones(2)}, tmp_path / "plain.pt")
    assert load_state(tmp_path / "plain.pt")["step"] == 3  # what llmplan writes still reads back


@pytest.mark.parametrize("planted_file", [STATE_FILE, OPTIMIZER_FILE])
def test_resume_from_a_folder_with_a_planted_pickle_fails_clearly_and_runs_nothing(tiny_llama, tiny_alpaca,
                                                                                   tmp_path: Path, planted_file: str) -> None:
    config = tiny_config(tiny_llama, tiny_alpaca, tmp_path / "out", max_steps=2, save_every=2)
    state = setup(config)
    try:
        train(state, lambda metrics: None)
    finally:
        cleanup(state)
    marker = tmp_path / "ran"
    plant(latest_checkpoint(config.output_dir) / planted_file, marker)
    with pytest.raises(UnsafeCheckpoint, match=f"{planted_file} is not a checkpoint llmplan wrote"):
        resumed = setup(config.__class__(**{**config.__dict__, "resume": True, "max_steps": 3}))
        try:
            train(resumed, lambda metrics: None)
        finally:
            cleanup(resumed)
    assert not marker.exists()


def test_a_pickle_planted_in_a_deepspeed_checkpoint_is_refused_before_deepspeed_reads_it(tmp_path: Path) -> None:
    """DeepSpeed's load_checkpoint unpickles unrestricted: its files are read opcode by opcode first. A real ZeRO-2
    checkpoint (one gloo process) reads back; the same folder with a payload as its optimizer file (torch.save's zip
    format, or a bare pickle, which torch.load also reads) is refused and the payload never runs."""
    import json
    import socket
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("deepspeed_resume_probe.py")), str(tmp_path),
                           str(port)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert any(name.endswith("optim_states.pt") for name in outcome["files"])
    zipped, legacy = outcome["refused"]
    assert "optim_states.pt is not a checkpoint llmplan wrote (it names posix.system" in zipped
    assert "optim_states.pt is not a checkpoint llmplan wrote (not a torch checkpoint" in legacy
    assert outcome["ran"] is False

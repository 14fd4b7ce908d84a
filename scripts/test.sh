#!/usr/bin/env bash
# Install the test dependencies into .venv (CPU torch from this machine's disk, the runtime stack,
# pytest) and run the whole suite. README.md's second command; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
# DeepSpeed builds against the installed torch: after torch, without build isolation (not in the extras for that reason).
.venv/bin/python -m pip install -q --no-build-isolation deepspeed
.venv/bin/python -m pip install -q -e ".[runtime,test]"
# pytest exits 5 when it collects no tests; set -e makes that (and any failure) fail the script.
.venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Install the test dependencies into .venv (CPU torch from this machine's disk, the runtime stack, pytest), start
# the services the suite needs (scripts/test_services.sh: PostgreSQL on loopback, chromium) and run the whole
# suite, or what "$@" selects (`bash scripts/test.sh -m "not slow"`: the fast lane). README.md's second command;
# .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/test_services.sh
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
# DeepSpeed builds against the installed torch: after torch, without build isolation (not in the extras for that reason).
.venv/bin/python -m pip install -q --no-build-isolation deepspeed
.venv/bin/python -m pip install -q -e ".[runtime,test]"
start_postgres
find_browser
# The browser test's screenshot of the dashboard (a finished job with its loss curve) lands here.
export LLMPLAN_ARTIFACTS="${LLMPLAN_ARTIFACTS:-$PWD/artifacts}"
echo "dashboard screenshot: $LLMPLAN_ARTIFACTS/dashboard.png" >&2
# pytest exits 5 when it collects no tests; set -e makes that (and any failure) fail the script.
.venv/bin/python -m pytest "$@"

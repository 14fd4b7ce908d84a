"""Parts CI must never skip: a test that needs one that is absent skips on a developer's machine but fails
when $CI is set, so CI cannot pass without having run it."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(skip_reason: str, ci_failure: str) -> NoReturn:
    """Skip with `skip_reason`; under CI, fail with `ci_failure` instead."""
    if running_in_ci():
        pytest.fail(ci_failure)
    pytest.skip(skip_reason)

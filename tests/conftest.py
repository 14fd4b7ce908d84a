"""The whole suite: commands that start llmplan's local Ray head (`generate`, `chat`, `submit` without a cluster
address) start the suite's own, which is stopped at the end; a user's head (~/.llmplan/ray-head) is never touched."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def own_local_ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    os.environ["LLMPLAN_RAY_HEAD_FILE"] = str(tmp_path_factory.mktemp("ray-head") / "ray-head")
    yield
    if os.path.exists(os.environ["LLMPLAN_RAY_HEAD_FILE"]):
        from llmplan.runtime.jobs.cluster import stop_local_head

        stop_local_head()

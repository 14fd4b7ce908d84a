"""Connecting to Ray: an embedded local instance by default, or a cluster by address."""

from __future__ import annotations

import os

RAY_ADDRESS_ENV = "LLMPLAN_RAY_ADDRESS"


def ensure_ray(address: str | None = None) -> None:
    """Start (or join) Ray once per process: `address`, else $LLMPLAN_RAY_ADDRESS, else a local instance."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get(RAY_ADDRESS_ENV) or None
    ray.init(address=target, include_dashboard=False, log_to_driver=False, configure_logging=False)

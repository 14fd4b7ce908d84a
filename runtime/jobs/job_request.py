"""A job's request as the store keeps it besides its plan: written at submission, read by the scheduler,
the retries and `llmplan submit --wait`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_RETRIES = 2  # re-planned retries after running out of memory


@dataclass(frozen=True)
class JobRequest:
    """A job's request as the store keeps it, besides its plan: who runs it, how often it is retried, the
    hardware it was planned for, a fine-tuning's config and the memory margin it was planned with, where
    its folder and the model cache are. An inference job's inputs are stored beside these keys."""

    runner: str | None = None  # scheduler.SCHEDULER_RUNNER when the scheduler runs it
    max_retries: int = DEFAULT_MAX_RETRIES
    hardware: dict[str, Any] | None = None  # planner.hardware.Hardware.to_dict(); None: the CPU
    config: dict[str, Any] | None = None  # TrainConfig.to_dict()
    margin: float | None = None
    jobs_dir: str | None = None
    model_cache: str | None = None

    def to_dict(self) -> dict[str, Any]:
        stored = {"runner": self.runner, "max_retries": self.max_retries, "jobs_dir": self.jobs_dir,
                  "model_cache": self.model_cache, "hardware": self.hardware}
        optional = {"config": self.config, "margin": self.margin}
        return {**stored, **{key: value for key, value in optional.items() if value is not None}}

    @classmethod
    def from_dict(cls, request: Mapping[str, Any]) -> "JobRequest":
        """The request's known keys (an inference job's inputs and the task are not among them)."""
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in request.items() if key in known and value is not None}
        return cls(**values)

    @property
    def card(self) -> str:
        """The GPU it was planned for, or "cpu"."""
        return self.hardware["gpu"] if self.hardware else "cpu"

    def planned_hardware(self) -> Any:
        from llmplan.planner.hardware import hardware_from_dict

        return hardware_from_dict(self.hardware) if self.hardware else None

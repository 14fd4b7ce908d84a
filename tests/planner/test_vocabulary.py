"""One vocabulary: the planner's enums name methods, precisions, backends, quant modes and kernels; the
runtime's config and the commands' choices are derived from them, and no other class takes their names."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import click

from llmplan.planner import request
from llmplan.planner.request import EstimateRequest, Kernels, Method, Offload, Optimizer, Precision, Quant, values_of
from llmplan.planner.search import Backend

ROOT = Path(__file__).resolve().parents[2]
ENUMS = (Method, Precision, Quant, Optimizer, Offload, Kernels, Backend)


def test_no_other_class_takes_the_name_of_a_planner_enum() -> None:
    names = {enum.__name__ for enum in ENUMS}
    found = [(str(path.relative_to(ROOT)), node.name) for folder in ("planner", "runtime", "cli")
             for path in sorted((ROOT / folder).rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef) and node.name in names]
    assert sorted(name for _, name in found) == sorted(names), found


def test_the_runtime_config_and_the_submit_choices_come_from_the_enums() -> None:
    from llmplan.cli.submit import submit_finetune
    from llmplan.runtime.train import train_config

    assert (train_config.METHODS, train_config.PRECISIONS, train_config.OFFLOADS) == tuple(
        values_of(enum) for enum in (Method, Precision, Offload))
    assert set(train_config.BACKENDS) == set(values_of(Backend)) - {Backend.FSDP.value}
    choices = {param.name: tuple(param.type.choices) for param in submit_finetune.params
               if isinstance(param.type, click.Choice)}
    assert choices["method"] == ("auto", *values_of(Method)) and choices["precision"] == values_of(Precision)
    assert choices["offload"] == values_of(Offload) and choices["kernels"] == values_of(Kernels)


def test_the_estimate_request_names_its_batch_a_micro_batch() -> None:
    names = {field.name for field in dataclasses.fields(EstimateRequest)}
    assert "micro_batch_size" in names and "batch_size" not in names
    assert request.LoraSpec().alpha == 2 * request.LoraSpec().r

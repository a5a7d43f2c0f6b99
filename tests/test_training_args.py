"""Every training option does something: a `TrainingConfig` field that nothing reads is a flag that lies."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from clip_diffusionlm.training_args import TrainingConfig

SOURCE = Path(__file__).resolve().parents[1] / "src" / "clip_diffusionlm"
ARGUMENTS_FILE = SOURCE / "training_args.py"


def _reads_of(tree: ast.AST, owner: str) -> set[str]:
    """Attribute names read as `config.X`, `run.config.X` (owner "config") or `self.X` (owner "self")."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            value = node.value
            if (isinstance(value, ast.Name) and value.id == owner) or (
                owner == "config" and isinstance(value, ast.Attribute) and value.attr == "config"
            ):
                names.add(node.attr)
    return names


def fields_read() -> set[str]:
    """The fields read outside `training_args.py`, directly or through a `TrainingConfig` property that is."""
    read = set()
    for path in SOURCE.rglob("*.py"):
        if path != ARGUMENTS_FILE:
            read |= _reads_of(ast.parse(path.read_text(encoding="utf-8")), "config")
    (config_class,) = [
        node for node in ast.walk(ast.parse(ARGUMENTS_FILE.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef) and node.name == "TrainingConfig"
    ]
    for method in config_class.body:
        is_property = isinstance(method, ast.FunctionDef) and any(
            isinstance(decorator, ast.Name) and decorator.id == "property" for decorator in method.decorator_list
        )
        if is_property and method.name in read:
            read |= _reads_of(method, "self")
    return read


def test_every_training_option_is_read_by_the_code_it_configures():
    unread = sorted(field.name for field in dataclasses.fields(TrainingConfig) if field.name not in fields_read())
    assert unread == [], f"TrainingConfig fields that nothing reads (wire or delete them): {unread}"


def test_the_reader_finds_reads_through_properties_and_the_run():
    read = fields_read()
    assert {"hub_private_repo", "hub_token", "learning_rate"} <= read  # `run.config.X` and `config.X`
    assert "weighting_scheme" in read  # only through the `timestep_sampling` property
    assert "not_a_field" not in read

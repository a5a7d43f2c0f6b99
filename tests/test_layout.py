"""The package's layers, read from its import graph: models ← diffusion ← pipelines ← data/training/hub ← cli, no circles,
and the repository code (models, pipelines) importing nothing else of the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "clip_diffusionlm"
PACKAGE = "clip_diffusionlm"


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in SOURCE.rglob("*.py") if "caption_scores" not in path.parts}


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> set[str]:
    """The package's modules an import statement names (the most specific existing module of each name)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = importer if MODULES[importer].name == "__init__.py" else importer.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                package = package.rsplit(".", 1)[0]
            base = f"{package}.{base}" if base else package
        # `from .x import y`: y is a submodule, or a name whose module is x (the loop below walks up to it).
        names = [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE):
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= resolve(name, node)
        # A package importing its own submodules, or a submodule its package, is not a dependency between layers.
        graph[name] = {edge for edge in edges if edge != name}
    return graph


def in_layer(module: str, *layers: str) -> bool:
    return any(module == f"{PACKAGE}.{layer}" or module.startswith(f"{PACKAGE}.{layer}.") for layer in layers)


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    # Edges from a package's __init__ into its own subpackage are how it re-exports; they cannot make a circle on
    # their own, so they stay in the graph.
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for edge in sorted(graph[module]):
            if state.get(edge) == "open":
                pytest.fail(f"import circle: {' → '.join(path[path.index(edge):] + [edge])}")
            if edge not in state:
                visit(edge, path + [edge])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize(
    ("layer", "allowed"),
    [
        ("models", ("models",)),  # Hub remote code: only each other
        ("pipelines", ("pipelines",)),  # Hub remote code: only each other
        ("diffusion", ("diffusion", "models")),
    ],
)
def test_lower_layers_import_only_what_is_below_them(layer, allowed):
    graph = import_graph()
    for module, edges in graph.items():
        if in_layer(module, layer):
            outside = sorted(edge for edge in edges if not in_layer(edge, *allowed))
            assert not outside, f"{module} imports {outside}"


def test_nothing_below_the_application_imports_training_hub_demo_or_the_cli():
    graph = import_graph()
    for module, edges in graph.items():
        if in_layer(module, "models", "diffusion", "pipelines", "data", "metrics"):
            upward = sorted(edge for edge in edges if in_layer(edge, "training", "training_args", "hub", "demo", "cli"))
            assert not upward, f"{module} imports {upward}"


def test_the_core_imports_nothing_of_the_demo_world():
    """The shapes world, its content accuracy, the toy CLIP and the demo run live in `demo/`; only the CLI (for its
    `demo`, `train` and `evaluate` commands) reaches into it."""
    graph = import_graph()
    importers = {module for module, edges in graph.items() if any(in_layer(edge, "demo") for edge in edges)}
    assert {module for module in importers if not in_layer(module, "demo")} == {f"{PACKAGE}.cli"}


def test_the_graph_reader_sees_real_edges():
    """The checks above only mean something if the reader finds imports: a few known edges must be there."""
    graph = import_graph()
    assert f"{PACKAGE}.models.modeling_clip_diffusionlm" in graph[f"{PACKAGE}.diffusion"]
    assert f"{PACKAGE}.pipelines.captioning_utils" in graph[f"{PACKAGE}.pipelines.pipeline_clip_diffusion_caption"]
    assert f"{PACKAGE}.hub.model_card" in graph[f"{PACKAGE}.hub.repository"]
    assert f"{PACKAGE}.demo" in graph[f"{PACKAGE}.cli"]  # an import inside a function counts too

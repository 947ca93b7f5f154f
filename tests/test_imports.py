"""Seams: no import cycle among archbench's modules, and parsing a spec needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "models")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Our modules a file imports, at the top or inside a function (a deferred import is still an edge:
    it only hides a cycle until the function runs); `if TYPE_CHECKING:` blocks never run and are not."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    edges = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from models import attention` imports a submodule; `from models import register` the package
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        edges |= {n for n in names if n in modules}
    return edges


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) - {module_name(p)} for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_among_our_modules_deferred_imports_included():
    graph = import_graph()
    assert "models.config" in graph and "models.gpt" in graph["models.accounting"]  # the graph is real
    assert "bench.train" in graph["bench.workers"] and "bench.workers" in graph["bench.run"]  # deferred: an edge too
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    deferred = tmp_path / "a.py"
    deferred.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import c\n\n\ndef f():\n    import b\n")
    assert imports_of(deferred, {"b", "c"}) == {"b"}  # inside a function: an edge; for type checkers only: none


def test_model_config_is_data():
    tree = ast.parse((ROOT / "models" / "config.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not imported & {"models.gpt", "models.accounting", "torch"}  # not even inside a function
    from models import ModelConfig

    assert not any(hasattr(ModelConfig, name) for name in ("shapes_only", "param_counts", "flops_per_token"))


def test_parsing_a_spec_imports_no_torch():
    code = ("import sys; from bench.spec import load_spec; load_spec('ablations/attention.yaml', []); "
            "from bench.kernels import KernelSpec; KernelSpec(attention={'variants': ['mha']}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_run_configuration_lives_apart_from_the_training_loop():
    graph = import_graph()
    for module in ("bench.plan", "bench.run", "bench.executor", "bench.worker"):
        assert "bench.config" in graph[module], module
    import bench.train

    assert not hasattr(bench.train, "TrainConfig") and not hasattr(bench.train, "resolve_run")

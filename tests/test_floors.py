"""The floors of the house: a lower layer never imports a higher one, not even lazily inside a function.

    benchmarks   experiments over everything below
    loadtests    load generation, experiment runners, faults
    deployments  Ray Serve glue (ingress.py, app.py, autoscaling.py, local.py) over the Ray-free serving core
    elastic_core the model, the schedule, the engine: no Ray, no serving stack

Read from the source (every ``import`` statement, at any depth), so a violation fails here before it can
bite in a process that lacks the higher floor. The commands of the higher floors reach the ``elasticlm``
CLI through entry points (pyproject.toml), not through imports in ``elastic_core/cli.py``.
"""

import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]
FLOORS = ["elastic_core", "deployments", "loadtests", "benchmarks"]  # lowest first
NOT_BELOW = {  # what each floor must never import
    "elastic_core": {"ray", "deployments", "loadtests", "benchmarks"},
    "deployments": {"loadtests", "benchmarks"},
    "loadtests": {"benchmarks"},
}
# the serving core and its protocol adapters run without Ray (tests/test_serving_core.py runs them so)
RAY_FREE = ["deployments.core", "deployments.http.app", "deployments.grpc_adapter", "deployments.tei_grpc_adapter"]
# what clients, the load generator and the peer server import: nothing beyond the standard library
STANDARD_LIBRARY_ONLY = ["deployments/wire.py", "deployments/ports.py", "deployments/endpoints.py", "loadtests/report.py"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, by its full name, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            name = ".".join(p for p in (base, node.module) if p)
            found.add(name)
            if node.module is None:  # `from . import x`: x is a module of the package
                found |= {f"{name}.{alias.name}" for alias in node.names}
    return found


def sources(floor: str) -> list[Path]:
    return sorted(p for p in (REPO / floor).rglob("*.py") if "_pb2" not in p.name)


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("floor", list(NOT_BELOW))
def test_no_import_runs_up_a_floor(floor):
    violations = [f"{path.relative_to(REPO)} imports {name}" for path in sources(floor)
                  for name in sorted(imports(path)) if top(name) in NOT_BELOW[floor]]
    assert not violations, "a lower floor imports a higher one:\n" + "\n".join(violations)


def test_the_serving_core_and_its_adapters_never_reach_ray():
    """Followed through every project module they import, however indirectly."""
    graph = {module_name(path): imports(path) for floor in FLOORS for path in sources(floor)}
    for root in RAY_FREE:
        seen, todo, path_to = set(), [root], {root: [root]}
        while todo:
            module = todo.pop()
            seen.add(module)
            for name in graph.get(module, ()):
                assert top(name) != "ray", f"{root} reaches ray: {' -> '.join(path_to[module] + [name])}"
                target = next((m for m in (name, name.rsplit(".", 1)[0]) if m in graph), None)
                if target and target not in seen:
                    path_to[target] = path_to[module] + [target]
                    todo.append(target)


@pytest.mark.parametrize("path", STANDARD_LIBRARY_ONLY)
def test_the_shared_light_modules_need_only_the_standard_library(path):
    outside = {name for name in imports(REPO / path) if top(name) not in sys.stdlib_module_names}
    assert not outside, outside


def test_the_scan_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    package = tmp_path / "elastic_core"
    package.mkdir()
    (package / "cli.py").write_text("from .data import X\n\ndef serve():\n    from deployments.local import main\n")
    assert imports(package / "cli.py") == {"elastic_core.data", "deployments.local"}


@pytest.mark.parametrize("command", ["serve", "loadtest", "chaos"])
def test_the_commands_above_the_core_reach_the_cli_through_entry_points(command, capsys):
    from elastic_core.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and f"usage: elasticlm {command}" in capsys.readouterr().out

"""The house has no import cycle (function-level and TYPE_CHECKING imports included), and
importing the package, or one pure module of it, stays cheap."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.support.services import ROOT

PACKAGES = ("api_tasks", "config", "worker")


def _module(path: str) -> str:
    name = path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (not the packages that
    Python runs on the way: an import of ``a.b`` counts as an edge to ``a.b`` only)."""
    files = {_module(str(p.relative_to(ROOT))): p for package in PACKAGES
             for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:  # `from a import b` may name a module a.b
                    full = f"{node.module}.{alias.name}"
                    edges.add(full if full in files else node.module)
        graph[name] = {edge for edge in edges if edge in files and edge != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 30  # the walk found the modules
    assert _cycles(graph) == []


def test_the_packages_are_layered_config_below_api_tasks_below_worker() -> None:
    """config imports nothing of the other two, and api_tasks nothing of the worker."""
    below = {"config": ("api_tasks", "worker"), "api_tasks": ("worker",)}
    wrong = sorted((module, target) for module, targets in _graph().items()
                   for target in targets
                   if target.split(".")[0] in below.get(module.split(".")[0], ()))
    assert wrong == []


# the subpackages along a job's path, and those each may import: arrows follow the data
# (producer -> queue -> task -> runner -> upstream HTTP -> stream relay -> Redis record ->
# reader); batches are a producer of jobs. Top-level modules other than these are the base
# every layer may use.
LAYERS = {
    "execution": {"upstream", "stream", "record"},
    "upstream": set(),
    "stream": {"upstream", "record"},
    "record": set(),
    "batches": {"record", "enqueue", "client"},
    "gateway": {"record", "enqueue", "batches"},  # a producer too, on asyncio (files, batches)
}
BASE = {"errors", "spec", "connections", "background", "exit_codes", "job_logs", "metrics",
        "tracing", "json_codec"}


def test_the_subpackages_follow_the_data_path() -> None:
    wrong = []
    for module, targets in _graph().items():
        parts = module.split(".")
        if parts[0] != "api_tasks" or len(parts) < 3 or parts[1] not in LAYERS:
            continue
        for target in targets:
            tparts = target.split(".")
            if tparts[0] != "api_tasks" or len(tparts) < 2 or tparts[1] == parts[1]:
                continue
            if tparts[1] not in LAYERS[parts[1]] | BASE:
                wrong.append((module, target))
    assert sorted(wrong) == []


def _loaded(statement: str) -> list[str]:
    code = (f"{statement}; import sys; print(' '.join(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('api_tasks', 'config', 'worker', 'redis', 'kombu', "
            "'celery', 'requests'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    return done.stdout.split()


def test_importing_the_package_or_a_pure_module_is_cheap() -> None:
    assert _loaded("import api_tasks") == ["api_tasks"]
    assert _loaded("import api_tasks.stream.sse") == [
        "api_tasks", "api_tasks.errors", "api_tasks.stream", "api_tasks.stream.sse"]
    assert _loaded("import api_tasks.upstream.merge") == [
        "api_tasks", "api_tasks.upstream", "api_tasks.upstream.merge"]
    spec = _loaded("import api_tasks.spec")
    assert not {"redis", "kombu", "celery", "requests"} & set(spec), spec

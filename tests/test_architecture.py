"""The package layout is the architecture: imports point one way along the request path, and the rooms that must
run without torch import none (docs/architecture.md#layout).

Every import counts, including those inside functions and under TYPE_CHECKING: a lazy import across a boundary is
still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the project modules `path` imports (`from a import b` counts a.b when a.b is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in ("service", "training") and m in MODULES}


MODULES = {_module_name(p): p for top in ("service", "training") for p in (ROOT / top).rglob("*.py")}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "service" and len(parts) > 1 else parts[0]


def test_rooms_import_each_other_only_through_the_contracts():
    allowed = {
        "service.contracts": {"service.contracts"},
        "service.api": {"service.api", "service.contracts"},
        "service.worker": {"service.worker", "service.contracts"},
    }
    crossings = [f"{m} -> {i}" for m, deps in GRAPH.items() if _room(m) in allowed
                 for i in deps if _room(i) not in allowed[_room(m)] and i != "service"]
    assert crossings == []


def test_service_never_imports_training_except_the_cli_dispatch():
    into_training = sorted(f"{m} -> {i}" for m, deps in GRAPH.items() if m.startswith("service")
                           for i in deps if i.startswith("training"))
    assert into_training == ["service.cli -> training.cli"]


def test_training_uses_the_service_only_through_its_model_execution_and_contracts():
    """Training generates images with the service's pipeline (one seed, one image everywhere) and shares the CLI's
    argument types; it never reaches the HTTP side or the serving command line."""
    reached = {i for m, deps in GRAPH.items() if m.startswith("training") for i in deps if i.startswith("service")}
    assert not {i for i in reached if i.startswith(("service.api", "service.serve")) or i == "service.cli"}, reached


def test_no_import_cycles():
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for dep in sorted(GRAPH.get(module, ())):
            if seen.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in seen:
                visit(dep, [*path, dep])
        seen[module] = 2

    for module in sorted(GRAPH):
        if module not in seen:
            visit(module, [module])
    assert cycles == []


def test_the_graph_is_real():
    """Guards the tests above against an empty graph (a broken walker would pass them)."""
    assert "service.contracts.queue" in GRAPH["service.worker.loop"]
    assert "service.api.events" in GRAPH["service.api.app"]
    assert len(MODULES) > 50


NO_TORCH = """
import sys
for name in ("torch", "diffusers", "transformers.models.clip.modeling_clip"):
    sys.modules[name] = None  # any import of these now raises ImportError
import service.api.app, service.api.events, service.worker.loop, service.worker.batcher, service.worker.runner
import service.contracts.queue, service.contracts.manifest, service.contracts.metrics, service.worker.backends
print("ok")
"""


def test_api_and_worker_loop_import_with_torch_blocked():
    out = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_torch_block_is_real():
    """The same block makes the model runner fail to import: the check above could fail."""
    script = NO_TORCH.split("import service")[0] + "import service.worker.model_runner\n"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "torch" in out.stderr


@pytest.mark.parametrize("room", ["service/api", "service/contracts", "service/worker"])
def test_each_room_says_what_it_is(room):
    assert ast.get_docstring(ast.parse((ROOT / room / "__init__.py").read_text()))

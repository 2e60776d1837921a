"""The house: one package per part of the method, the model adapter at the ground floor, no import cycles.

The imports are read from the source (every ``import`` and ``from ... import``, also those inside
functions, which run later but still tie one module to another), so nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "lite"

# What each part may import besides itself. Nothing imports upward: the model adapter knows no other part,
# decoding knows the model, training knows both (it trains on answers the model decodes), the verbs built
# on them know what they use, the CLI knows all.
ALLOWED = {
    "errors": set(),
    "files": {"errors"},
    "model": {"errors", "files"},
    "training": {"decoding", "model", "errors", "files"},  # own answers are decoded by the model
    "decoding": {"model", "errors", "files"},
    "calibration": {"decoding", "training", "model", "errors", "files"},
    "evaluation": {"calibration", "decoding", "model", "errors", "files"},  # the ceiling, by calibration's scorer
    "serving": {"decoding", "model", "errors", "files"},
    "demo": {"decoding", "evaluation", "model", "errors", "files"},
    "api": {"decoding", "model", "errors", "files"},  # lite.load / LiteLM.generate: a face over the two
    "cli": {"training", "decoding", "calibration", "evaluation", "serving", "demo", "model", "errors", "files"},
    "__main__": {"cli"},
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("lite", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The lite modules that module ``name`` imports (a name taken from a package counts as that package,
    unless it is itself a submodule)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "lite.x.y.name" -> the module that holds it
                target = target.rpartition(".")[0]
            if target.startswith("lite") and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else "lite"


def test_the_import_walker_sees_relative_lazy_and_package_imports():
    graph = _graph()
    assert "lite.model.adapter" in graph["lite.decoding.engine"]  # from ..model.adapter import LiteModel
    assert "lite.decoding.speculative" in graph["lite.decoding"]  # the factory in the package's face
    assert "lite.model.loading" in graph["lite.training.trainer"]  # an import inside a function
    assert "lite.decoding.confidence" in graph["lite.calibration.calibrate"]  # from ..decoding import confidence


def test_the_walker_finds_a_cycle_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_lite_modules():
    cycles = _cycles(_graph())
    assert cycles == [], f"import cycles: {cycles}"


def test_nothing_imports_upward():
    wrong = []
    for module, targets in _graph().items():
        part = _part(module)
        if part == "lite":  # the top-level face hands names on lazily
            continue
        for target in targets:
            other = _part(target)
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{module} -> {target}")
    assert wrong == [], "imports against the floor plan:\n" + "\n".join(sorted(wrong))


def test_every_part_is_on_the_floor_plan():
    parts = {_part(m) for m in _modules()} - {"lite"}
    assert parts <= set(ALLOWED), f"add {sorted(parts - set(ALLOWED))} to ALLOWED with what it may import"


def test_at_most_six_top_level_modules_besides_the_packages():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top


@pytest.mark.parametrize("name,home", [
    ("LiteConfig", "lite.model.config"), ("default_exit_layers", "lite.model.config"),
    ("load_model", "lite.model.loading"), ("DEFAULT_MODEL", "lite.model.loading"),
    ("load", "lite.api"), ("LiteLM", "lite.api")])
def test_public_names_still_come_from_the_top(name, home):
    """``lite.NAME`` is listed in ``lite.__all__`` and is the very object its home module defines."""
    import importlib

    import lite

    assert name in lite.__all__
    assert getattr(lite, name) is getattr(importlib.import_module(home), name)


def test_only_the_adapter_touches_transformers_model_internals():
    """Decoder blocks, rotary embeddings and the cache protocol are reached only through the adapter (and
    its fast path for plain Llama blocks, which the adapter alone calls)."""
    internals = ("rotary_emb", "apply_rotary_pos_emb", "input_layernorm", ".layers[", "past_key_values")
    offenders = []
    for name, path in _modules().items():
        if name in ("lite.model.adapter", "lite.model.fast_block"):
            continue
        assert "fast_block" not in path.read_text(), f"{name}: only the adapter calls the fast blocks"
        text = path.read_text()
        offenders += [f"{name}: {word}" for word in internals if word in text]
    assert offenders == []


def test_every_lite_name_the_benchmarks_and_scripts_import_exists():
    """Benchmarks are not run by the suite; a name they import from lite that moved would only show on the
    day someone runs them. Every ``from lite... import name`` in benchmarks/ must resolve."""
    import importlib
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    missing = []
    for path in sorted((root / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lite":
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing


def test_benchmarks_and_scripts_run_on_the_installed_package_and_its_public_names():
    """No benchmark, script or test edits the module search path (they run on the installed lite, ``pip
    install -e .``), no benchmark or script reads a private name of lite (``lite.x._y``, or ``from lite.x
    import _y``): a rename inside the package must not break them silently; and no benchmark imports another
    (what two of them share belongs in the package)."""
    root = Path(__file__).resolve().parent.parent
    search_path = "sys" + ".path"  # spelled apart: this file itself must not match a search for it
    found, private, sideways = [], [], []
    scripts = {p.stem for p in (root / "benchmarks").glob("*.py")}
    files = [p for folder in ("benchmarks", "scripts", "tests") for p in sorted((root / folder).rglob("*"))
             if p.suffix in (".py", ".sh") and p.is_file()]
    for path in files:
        text = path.read_text(encoding="utf-8")
        if search_path in text:
            found.append(str(path.relative_to(root)))
        if path.suffix != ".py" or path.parent.name == "tests":
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lite":
                names = [f"{node.module}.{a.name}" for a in node.names]
                private += [(path.name, n) for n in names if any(p.startswith("_") for p in n.split("."))]
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            sideways += [(path.name, m) for m in modules if m.split(".")[0] in scripts]
    assert found == [], f"{search_path} in {found}"
    assert private == []
    assert sideways == [], "a benchmark imports another benchmark: move what they share into the package"


def test_the_suite_cannot_reach_the_network_or_the_hub():
    """conftest's guard: a connection off this machine fails at once (no test waits on retries), the
    loopback servers of the serving tests still connect, and huggingface_hub is offline."""
    import socket

    import huggingface_hub.constants

    with pytest.raises(OSError, match="never reach the network"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    socket.create_connection(server.getsockname(), timeout=1).close()
    server.close()
    assert huggingface_hub.constants.is_offline_mode()

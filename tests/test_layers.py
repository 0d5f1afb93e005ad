"""The package's layers: every module imports only from the layers below it, with no import
cycle, function-local imports included (read from the source, never by importing it).

``LAYERS`` is the architecture, bottom first; a new module takes its place here. The kernels
(``mtpkern.ops``) are one layer: a package whose modules import each other, but nothing above.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mtpkern"

LAYERS: list[tuple[str, list[str]]] = [
    ("foundations: devices, the measurement cache, files, graph capture, sampling rules, engine inputs",
     ["runtime", "checkpoint", "graphs", "sampling", "inputs"]),
    ("CPU product layouts (measured, kept in the runtime's cache)", ["cpu_matmul"]),
    ("kernels: one torch.library op per file", ["ops"]),
    ("specs: trees, model config, calibration data, datasets, plots", ["tree", "config", "calibration", "data", "plots"]),
    ("blocks and the KV cache; the tree planner (pure)", ["layers", "planner"]),
    ("the Llama family's blocks (on the KV cache and attention of the layers below)", ["llama"]),
    ("the models", ["models"]),
    ("MEDUSA heads in other tools' layouts (FasterDecoding, vLLM, TensorRT-LLM)", ["heads_io"]),
    ("GGUF files: header checks, dequantised through transformers", ["gguf_io"]),
    ("checkpoint and Hugging Face I/O", ["hf_io"]),
    ("decoding options; training objectives", ["options", "objectives"]),
    ("the step parts both engines share; metrics; run folders", ["core", "metrics", "rundir"]),
    ("the single-row step core; the training loop", ["steps", "train"]),
    ("the cost model (times the core)", ["costmodel"]),
    ("the auto tree (plans from the cost model)", ["autotree"]),
    ("the engines", ["decoder", "batch"]),
    ("one-call generation; commands over engines", ["generation", "distill", "eval"]),
    ("commands over those", ["calibrate", "bench"]),
    ("train then calibrate", ["commands"]),
    ("the demo", ["demo"]),
    ("the command line", ["cli"]),
    ("the package's public names", ["__init__"]),
]

# Modules that may import mtpkern inside a function (the CLI's start-up: a command loads only
# what it runs). Everything else imports at the top.
LOCAL_IMPORTS_ALLOWED = {"cli"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts
    if parts[0] == "ops":
        return "ops"
    return "__init__" if parts == ("__init__",) else ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported mtpkern module, line, inside a function) for every import of the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    local_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    pkg = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    pkg = pkg if path.name == "__init__.py" else pkg[:-1]
    if pkg[-1] == "__init__":
        pkg = pkg[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [base] if base != "mtpkern" else [f"mtpkern.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "mtpkern" or t.startswith("mtpkern."):
                out.append((_target(t), node.lineno, node.lineno in local_lines))
    return out


def _target(dotted: str) -> str:
    parts = dotted.split(".")[1:]
    if not parts:
        return "__init__"
    if parts[0] == "ops":
        return "ops"
    if parts[0] == "_C":
        return "ops"  # the compiled extension, loaded by the ops
    return parts[0]


def _graph() -> dict[str, list[tuple[str, str, bool]]]:
    """module -> [(imported module, where, inside a function)]."""
    graph: dict[str, list[tuple[str, str, bool]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        edges = graph.setdefault(name, [])
        for target, line, local in _imports(path):
            if target != name:
                edges.append((target, f"{path.relative_to(PACKAGE.parent)}:{line}", local))
    return graph


def _cycle(graph) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for target, _, _ in graph.get(node, []):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if state.get(target) is None:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_local_imports_included():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    listed = [m for _, mods in LAYERS for m in mods]
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert set(_graph()) == set(listed), (f"not in LAYERS: {sorted(set(_graph()) - set(listed))}; "
                                         f"listed but missing: {sorted(set(listed) - set(_graph()))}")


def test_modules_import_only_from_the_layers_below():
    layer = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
    wrong = [f"{where}: {name} ({LAYERS[layer[name]][0]}) imports {target} ({LAYERS[layer[target]][0]})"
             for name, edges in _graph().items() for target, where, _ in edges
             if layer[target] >= layer[name]]
    assert not wrong, "\n".join(wrong)


def test_imports_of_the_package_sit_at_the_top():
    local = [f"{where}: {name} imports {target} inside a function"
             for name, edges in _graph().items() if name not in LOCAL_IMPORTS_ALLOWED
             for target, where, inside in edges if inside]
    assert not local, "\n".join(local)


@pytest.mark.parametrize("source, cycle", [
    ({"a": "from mtpkern import b\n", "b": "import mtpkern.a\n"}, ["a", "b", "a"]),
    ({"a": "def f():\n    from mtpkern.b import g\n", "b": "from . import a\n"}, ["a", "b", "a"]),
])
def test_the_cycle_check_finds_cycles(tmp_path, monkeypatch, source, cycle):
    """The check itself: a cycle through a top-level or a function-local import, absolute or
    relative, is found (a package of two modules written for the test)."""
    pkg = tmp_path / "mtpkern"
    pkg.mkdir()
    for name, text in source.items():
        (pkg / f"{name}.py").write_text(text)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    found = _cycle(_graph())
    assert found is not None and found[0] == found[-1] and sorted(set(found)) == sorted(set(cycle))

"""The house rules of tvmquant's modules, read from their source (ast): who may import whom, and where TVM goes.

The flow is frontend/ (ONNX or Relax in) -> passes/ (annotate -> calibrate -> realize) -> schedules/ ->
compile/export. Each folder is one stage; the vocabulary they share (op table, quantization parameters, Relax
rewriter, compat imports, ...) stands below all of them, and nothing reaches back up. Lazy imports inside
functions count too: they are dependencies all the same.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tvmquant"

#: The shared vocabulary below the stages (modules directly in tvmquant/).
BASE = {"quant_math", "config", "_io", "_compat", "_relax", "op_table", "qparams", "target", "threads"}
#: What the user and the build drive: no stage imports these.
TOP = {"api", "cli", "compile", "deploy", "export", "benchmark", "library", "tuning", "report"}
EVERYTHING = {path.stem if path.parent == PACKAGE else path.parent.name for path in PACKAGE.rglob("*.py")} - {
    "__init__"
}

#: Component -> the tvmquant components it may import (a component is a folder of tvmquant/, or "base").
ALLOWED = {
    "base": BASE,
    "calibration": {"calibration", "config", "quant_math"},  # the algorithms: numpy only
    "frontend": BASE | {"frontend"},
    "passes": BASE | {"frontend", "calibration", "passes"},
    # The kernels: the shared base, and the runtime side's nvcc helpers and remote measuring (below everything).
    "schedules": BASE | {"schedules", "cuda_binaries", "remote"},
}

#: Modules that must import no TVM at all (configs and calibration load without it; see test_calibration).
TVM_FREE = {"calibration", "quant_math", "config", "qparams", "op_table", "_io", "threads"}
#: Imports that change between TVM versions: only _compat.py and schedules/ (which keeps its own) import them.
VERSION_SENSITIVE = ("tvm_ffi", "tvm.s_tir", "tvm.sym", "tvm.tirx", "tvm.support", "tvm.base")
VERSION_SENSITIVE_NAMES = {"GenericConst", "TensorType", "meta_schedule"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()


def _is_module(module: str) -> bool:
    return _is_package(module) or (PACKAGE.parent / (module.replace(".", "/") + ".py")).exists()


def imports_of(module: str, source: str) -> set[str]:
    """The absolute names of the modules ``module`` (with the given source) imports, anywhere in the file."""
    package = module if _is_package(module) else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x`: x may be a module of its own
                found.add(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
    return found


def component(module: str) -> str | None:
    """``"frontend"``, ``"base"``, ... for a tvmquant module; None for anything else (and the package itself)."""
    parts = module.split(".")
    if parts[0] != "tvmquant" or len(parts) == 1:
        return None
    return "base" if parts[1] in BASE else parts[1]


def _name(module: str) -> str:
    """The name ALLOWED uses: a folder, or a module directly in tvmquant/."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tvmquant"


def violations(module: str, source: str) -> list[str]:
    """Imports of ``module`` that break :data:`ALLOWED`."""
    allowed = ALLOWED.get(component(module))
    if allowed is None:
        return []
    bad = []
    for target in sorted(imports_of(module, source)):
        if target.split(".")[0] != "tvmquant" or target == "tvmquant" or _name(target) == _name(module):
            continue  # outside tvmquant, the package root (``__version__``; it loads the rest lazily), or itself
        if _name(target) not in allowed:
            bad.append(f"{module} imports {target}")
    return bad


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield _module_name(path), path.read_text()


def test_each_stage_imports_only_what_stands_below_it():
    bad = [line for module, source in _sources() for line in violations(module, source)]
    assert not bad, "imports against the layering (see ALLOWED in tests/test_layering.py):\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "module, line",
    [
        ("tvmquant.frontend.qdq", "from ..passes import calibrate"),
        ("tvmquant.frontend.qdq", "def f():\n    from ..passes.annotate import LayerInfo"),
        ("tvmquant.frontend.onnx", "import tvmquant.passes.realize"),
        ("tvmquant.passes.annotate", "from ..api import quantize"),
        ("tvmquant.passes.calibrate", "from .. import compile"),
        ("tvmquant.op_table", "from .passes import annotate"),
        ("tvmquant.calibration.observers", "from .._relax import BindingRewriter"),
        ("tvmquant.schedules.x86.build", "from ...deploy import load_library"),
        ("tvmquant.schedules.cuda.tune", "from ...passes import annotate"),
    ],
)
def test_the_rules_catch_an_upward_import(module, line):
    assert violations(module, line), f"{line!r} in {module} should break the layering"


def test_tvm_free_modules_import_no_tvm():
    bad = []
    for module, source in _sources():
        if _name(module) in TVM_FREE:
            bad += [
                f"{module} imports {t}" for t in imports_of(module, source) if t.split(".")[0] in ("tvm", "tvm_ffi")
            ]
    assert not bad, "\n".join(bad)


def _outside_compat(module: str) -> bool:
    return _name(module) not in ("_compat", "schedules")


def test_version_sensitive_tvm_goes_through_compat():
    bad = []
    for module, source in _sources():
        if not _outside_compat(module):
            continue
        for target in imports_of(module, source):
            if any(target == name or target.startswith(name + ".") for name in VERSION_SENSITIVE):
                bad.append(f"{module} imports {target}")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr in VERSION_SENSITIVE_NAMES:
                bad.append(f"{module} line {node.lineno} uses .{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tvm"):
                bad += [
                    f"{module} imports {a.name} from {node.module}"
                    for a in node.names
                    if a.name in VERSION_SENSITIVE_NAMES
                ]
    assert not bad, "import these from tvmquant._compat instead:\n" + "\n".join(sorted(bad))


def _import_time_statements(tree: ast.Module):
    """Every statement that runs when the module is imported (not inside a function)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        pending.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))


def _writes_environment(node) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Subscript) and isinstance(sub.ctx, ast.Store) and ast.unparse(sub.value) == "os.environ":
            return True
        if isinstance(sub, ast.Call) and ast.unparse(sub.func) in (
            "os.environ.setdefault",
            "os.environ.update",
            "os.putenv",
        ):
            return True
    return False


def test_no_environment_writes_at_import_time():
    bad = []
    for module, source in _sources():
        if _name(module) == "schedules":
            continue
        for node in _import_time_statements(ast.parse(source)):
            compound = (ast.ClassDef, ast.If, ast.Try, ast.With, ast.For, ast.While)  # their statements come one by one
            if not isinstance(node, compound) and _writes_environment(node):
                bad.append(f"{module} line {node.lineno}: {ast.unparse(node)[:80]}")
    assert not bad, "environment written on import:\n" + "\n".join(bad)

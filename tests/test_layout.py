"""The shape of the code, checked like a lint rule: where protobuf may be imported, module sizes,
and tools that run without path hacks.

The checkers are plain functions over source text, so the tests at the bottom show each one
catching a violation in a snippet or a temporary folder.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "onnxhq"
TOOLS = ROOT / "tools"

#: The graph/IO modules: the only ones that may import ``onnx`` at run time (paths relative to
#: onnxhq/). Everything else works on numpy arrays and passes ModelProto objects through untouched,
#: importing onnx only under ``if TYPE_CHECKING:`` for annotations. Add a module here only if it
#: reads, builds or edits graphs (protobuf) itself.
PROTOBUF_MODULES = frozenset(
    {
        "model.py",  # load, validate, read and replace initializers, input specs, metadata, save
        "graphfile.py",  # model files: parse, tensors, external data, checks, opset/IR
        "lazy.py",  # external-data weights read one tensor at a time
        "normalize.py",  # load-time clean-up: hidden constant weights made initializers
        "fold.py",  # BatchNormalization folded into the Conv/ConvTranspose/Gemm before it
        "compact.py",  # the written graph: short names, no doc strings or default attributes
        "rewrite.py",  # quantized weights -> dequantize nodes
        "encode.py",  # rewritten model -> graph + sidecar artifacts
        "decode.py",  # artifacts -> runnable model
        "decode_streamed.py",  # artifacts -> runnable model, one sidecar stream at a time
        "describe.py",  # report of saved artifacts
        "outputs.py",  # which graph output is the class score
        "training/graph.py",  # the training view of a graph (loss, BatchNorm folding, gradients)
        "training/worker_main.py",  # the gradient worker converts graphs above opset 21 down
        "differentiable.py",  # graph of the differentiable quantizer
        "hessian/activations.py",  # activations captured as extra graph outputs
        "hessian/uses.py",  # which input each weight multiplies; weights made graph inputs
        "hessian/gauss_newton.py",  # Gauss-Newton graph construction
        "layer_inputs.py",  # layer inputs captured as extra graph outputs (X X^T per weight)
        "native.py",  # dequantize nodes -> DequantizeLinear (onnxruntime's low-bit forms)
        "native_contrib.py",  # MatMulNBits / GatherBlockQuantized nodes (com.microsoft)
        "lowbit.py",  # a float model lowered to MatMulNBits / GatherBlockQuantized block grids
        "training/shapes.py",  # symbolic dims the gradient builder would wrongly take as equal
    }
)
MAX_MODULE_LINES = 450


def runtime_onnx_imports(source: str) -> list[int]:
    """Line numbers where ``source`` imports onnx (or a submodule) outside ``if TYPE_CHECKING:``.

    Function-level imports count: they run too. ``onnxruntime`` and relative imports do not.
    """
    found: list[int] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch runs
                visit(child)
            return
        if isinstance(node, ast.Import):
            if any(_is_onnx(alias.name) for alias in node.names):
                found.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _is_onnx(node.module or ""):
                found.append(node.lineno)
        elif isinstance(node, ast.Call) and _imports_onnx_dynamically(node):
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return sorted(found)


def _is_onnx(module: str) -> bool:
    return module == "onnx" or module.startswith("onnx.")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports_onnx_dynamically(call: ast.Call) -> bool:
    """``importlib.import_module("onnx...")`` or ``__import__("onnx...")``."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name not in ("import_module", "__import__") or not call.args:
        return False
    first = call.args[0]
    return (
        isinstance(first, ast.Constant) and isinstance(first.value, str) and _is_onnx(first.value)
    )


def protobuf_violations(package: Path, allowed: frozenset[str]) -> list[str]:
    """``"path:line"`` of each runtime onnx import in ``package`` outside ``allowed`` modules."""
    out = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if relative in allowed:
            continue
        out += [f"{relative}:{line}" for line in runtime_onnx_imports(path.read_text())]
    return out


def long_modules(package: Path, limit: int) -> list[str]:
    """``"path (n lines)"`` of every module in ``package`` longer than ``limit`` lines."""
    out = []
    for path in sorted(package.rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append(f"{path.relative_to(package).as_posix()} ({n} lines)")
    return out


def sys_path_edits(source: str) -> list[int]:
    """Line numbers where ``source`` changes ``sys.path`` (calls on it, assignments to it)."""
    tree = ast.parse(source)
    sys_names, path_names = {"sys"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            sys_names |= {a.asname or a.name for a in node.names if a.name == "sys"}
        elif isinstance(node, ast.ImportFrom) and node.module == "sys":
            path_names |= {a.asname or a.name for a in node.names if a.name == "path"}

    def is_sys_path(expr: ast.expr) -> bool:
        while isinstance(expr, ast.Subscript):  # sys.path[0:0] = ...
            expr = expr.value
        if isinstance(expr, ast.Name):
            return expr.id in path_names
        return (
            isinstance(expr, ast.Attribute)
            and expr.attr == "path"
            and isinstance(expr.value, ast.Name)
            and expr.value.id in sys_names
        )

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if is_sys_path(node.func.value):  # sys.path.insert(...), .append, .extend, ...
                found.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(is_sys_path(t) for t in targets):
                found.append(node.lineno)
    return sorted(found)


# ---------------------------------------------------------------- the rules, on this repository


def test_protobuf_is_imported_only_by_the_graph_and_io_modules():
    violations = protobuf_violations(PACKAGE, PROTOBUF_MODULES)
    assert not violations, (
        "runtime onnx imports outside the graph/IO modules (import it under `if TYPE_CHECKING:` "
        f"for annotations, or move the graph work into one of them): {violations}"
    )


def test_no_module_is_longer_than_the_limit():
    too_long = long_modules(PACKAGE, MAX_MODULE_LINES)
    assert not too_long, f"split these modules (at most {MAX_MODULE_LINES} lines): {too_long}"


def test_tools_do_not_edit_sys_path():
    edits = {p.name: sys_path_edits(p.read_text()) for p in sorted(TOOLS.glob("*.py"))}
    edits = {name: lines for name, lines in edits.items() if lines}
    assert not edits, f"tools editing sys.path (install the package instead), lines: {edits}"


# ---------------------------------------------------------------- the checkers catch violations


@pytest.mark.parametrize(
    "snippet, lines",
    [
        ("import onnx\n", [1]),
        ("import numpy as np, onnx.helper as h\n", [1]),
        ("from onnx import numpy_helper\n", [1]),
        ("from onnx.reference import ReferenceEvaluator\n", [1]),
        ("def f():\n    import onnx\n    return onnx\n", [2]),
        ("import importlib\nm = importlib.import_module('onnx.helper')\n", [2]),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import onnx\n", []),
        ("import typing\nif typing.TYPE_CHECKING:\n    from onnx import ModelProto\n", []),
        ("if TYPE_CHECKING:\n    import onnx\nelse:\n    import onnx\n", [4]),
        ("import onnxruntime\nfrom onnxruntime import InferenceSession\nimport onnxhq\n", []),
        ("from . import onnx\nfrom .onnx import x\n", []),
    ],
)
def test_runtime_onnx_imports_are_found_outside_type_checking(snippet, lines):
    assert runtime_onnx_imports(snippet) == lines


def test_a_package_module_importing_onnx_is_reported_unless_allowed(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "io.py").write_text("import onnx\n")
    (tmp_path / "sub" / "algo.py").write_text("import numpy\n\nfrom onnx import helper\n")
    (tmp_path / "light.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import onnx\n"
    )
    assert protobuf_violations(tmp_path, frozenset({"io.py"})) == ["sub/algo.py:3"]
    assert protobuf_violations(tmp_path, frozenset({"io.py", "sub/algo.py"})) == []


def test_long_modules_are_reported(tmp_path):
    (tmp_path / "short.py").write_text("x = 1\n" * 450)
    (tmp_path / "long.py").write_text("x = 1\n" * 451)
    assert long_modules(tmp_path, 450) == ["long.py (451 lines)"]


@pytest.mark.parametrize(
    "snippet, lines",
    [
        ("import sys\nsys.path.insert(0, 'x')\n", [2]),
        ("import sys as s\n\nif True:\n    s.path.append('x')\n", [4]),
        ("from sys import path\npath.extend(['x'])\n", [2]),
        ("import sys\nsys.path = ['x']\nsys.path[0:0] = ['y']\nsys.path += ['z']\n", [2, 3, 4]),
        ("import sys\nprint(sys.path[0], sys.argv)\nimport os\nos.path.join('a', 'b')\n", []),
    ],
)
def test_sys_path_edits_are_found(snippet, lines):
    assert sys_path_edits(snippet) == lines

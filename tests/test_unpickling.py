"""Nothing in the repository unpickles a file that could run code: torch.load always with weights_only=True."""

import ast
import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import pytest

from subprune.data import _ArrayUnpickler

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("subprune", "tests", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _unsafe_calls(source: str) -> list[str]:
    """Calls that unpickle without a restriction: torch.load without weights_only=True, pickle.load(s),
    numpy.load with allow_pickle=True, and Unpickler subclasses without find_class."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name, keywords = _dotted(node.func), {k.arg: k.value for k in node.keywords}
            safe = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
            if name == "torch.load" and not safe:
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "dill.load", "joblib.load"):
                found.append(f"line {node.lineno}: {name}")
            pickled = keywords.get("allow_pickle")
            if name in ("np.load", "numpy.load") and isinstance(pickled, ast.Constant) and pickled.value:
                found.append(f"line {node.lineno}: {name}(allow_pickle=True)")
        if isinstance(node, ast.ClassDef) and any(_dotted(b).endswith("Unpickler") for b in node.bases):
            if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                found.append(f"line {node.lineno}: Unpickler subclass {node.name} without find_class")
    return found


def test_the_scan_finds_what_it_looks_for():
    assert len(_unsafe_calls("import torch\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
                             "torch.load('x', weights_only=True)\npickle.load(f)\nnp.load('a', allow_pickle=True)\n"
                             "class U(pickle.Unpickler):\n    pass\n")) == 5


def test_no_unrestricted_unpickling_in_the_repository():
    assert len(SOURCES) > 50
    unsafe = {str(p.relative_to(ROOT)): calls for p in SOURCES if (calls := _unsafe_calls(p.read_text()))}
    assert unsafe == {}


def test_the_mnist_unpickler_reads_arrays_and_refuses_anything_else():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2]))
    loaded = _ArrayUnpickler(io.BytesIO(pickle.dumps(arrays)), encoding="latin1").load()
    assert all(np.array_equal(a, b) for a, b in zip(loaded, arrays, strict=True))

    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    with pytest.raises(pickle.UnpicklingError, match="builtins.print: only numpy arrays"):
        _ArrayUnpickler(io.BytesIO(pickle.dumps(Payload()))).load()
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as f:
        pickle.dump({"a": Path("x")}, f)
    with pytest.raises(pickle.UnpicklingError, match="pathlib"):
        _ArrayUnpickler(gzip.GzipFile(fileobj=io.BytesIO(buffer.getvalue()))).load()

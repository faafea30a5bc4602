"""Every error flowerpets raises on purpose is a FlowerpetsError (issue 10 item 4).

The test reads each module of the package and looks at every ``raise``:

* a built-in exception raised by name (``raise ValueError(...)``) is refused,
  except where a Python protocol demands that very class (``AttributeError``
  from a module's ``__getattr__``, ``KeyError`` from ``__getitem__``,
  ``NotImplementedError`` from an abstract method, ``SystemExit`` from a
  command line), and ``argparse.ArgumentTypeError`` (what argparse wants from
  a ``type=`` callable, and catches);
* any other class raised by name or by attribute (``raise module.Error(...)``)
  must resolve, in its module, to a subclass of
  :class:`~flowerpets.exceptions.FlowerpetsError`.

So ``except FlowerpetsError`` catches everything we raise, and the bare
``ValueError`` a bug throws is never mistaken for one of our refusals.
"""

from __future__ import annotations

import ast
import builtins
import importlib
from pathlib import Path

import pytest

import flowerpets
from flowerpets import _validation
from flowerpets.exceptions import (
    FlowerpetsError,
    MessageFieldError,
    ParameterTypeError,
    ParameterValueError,
)

PACKAGE = Path(flowerpets.__file__).parent

# (built-in, function it may be raised from): the protocols that require that class.
PROTOCOL_RAISES = {
    ("AttributeError", "__getattr__"),
    ("KeyError", "__getitem__"),
    ("KeyError", "__delitem__"),
    ("StopIteration", "__next__"),
}
ALWAYS_ALLOWED = {"NotImplementedError", "SystemExit", "KeyboardInterrupt"}
# Raised by attribute where a library's protocol wants its own class.
FOREIGN_ALLOWED = {"argparse.ArgumentTypeError"}
BUILTIN_EXCEPTIONS = {
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
}


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


def _dotted(node: ast.expr) -> str | None:
    """``"a.b.C"`` for ``a.b.C`` (names and attributes only), else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _raised(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(class name, enclosing function, line) of every ``raise C`` / ``raise C(...)``.

    ``C`` is a name or a dotted attribute whose last part is capitalised (a
    class); ``raise exc`` and ``raise self._error`` re-raise an instance.
    """
    out: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = child.name
            if isinstance(child, ast.Raise) and child.exc is not None:
                target = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                name = _dotted(target)
                if name is not None and name.rpartition(".")[2][:1].isupper():
                    out.append((name, function, child.lineno))
            visit(child, inner)

    visit(tree, "<module>")
    return out


MODULES = _modules()


def test_the_scan_sees_the_whole_package() -> None:
    names = {name for name, _ in MODULES}
    assert {"flowerpets.secagg.client", "flowerpets.dp.central", "flowerpets.core.codec"} <= names
    assert sum(len(_raised(ast.parse(p.read_text()))) for _, p in MODULES) > 300


def _lazy_imports(tree: ast.AST) -> dict[str, object]:
    """What the ``from flowerpets... import X`` inside functions bind (a lazy import is no
    module attribute, so the scan looks the class up where it comes from)."""
    found: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.partition(".")[0] != "flowerpets":
                continue
            source = importlib.import_module(node.module)
            for alias in node.names:
                found[alias.asname or alias.name] = getattr(source, alias.name, None)
    return found


@pytest.mark.parametrize("module_name, path", MODULES, ids=[name for name, _ in MODULES])
def test_every_error_raised_on_purpose_is_ours(module_name: str, path: Path) -> None:
    module = importlib.import_module(module_name)
    tree = ast.parse(path.read_text())
    lazy = _lazy_imports(tree)
    wrong = []
    for name, function, line in _raised(tree):
        where = f"{path.relative_to(PACKAGE.parent)}:{line} ({function})"
        if name in BUILTIN_EXCEPTIONS:
            if name in ALWAYS_ALLOWED or (name, function) in PROTOCOL_RAISES:
                continue
            wrong.append(f"{where}: raises the built-in {name}")
            continue
        if name in FOREIGN_ALLOWED:
            continue
        head, *rest = name.split(".")
        cls: object = getattr(module, head, lazy.get(head))
        for part in rest:
            cls = getattr(cls, part, None)
        if not (isinstance(cls, type) and issubclass(cls, FlowerpetsError)):
            wrong.append(f"{where}: raises {name}, which is not a FlowerpetsError")
    assert not wrong, "\n".join(wrong)


def test_the_scan_would_catch_a_bare_builtin_and_a_foreign_class() -> None:
    tree = ast.parse(
        "def f(x):\n    raise ValueError('no')\n"
        "def __getattr__(name):\n    raise AttributeError(name)\n"
        "class Foreign(Exception): ...\n"
        "def g():\n    raise Foreign\n"
        "def h(exc):\n    raise exc\n"
        "def i():\n    raise argparse.ArgumentTypeError('x')\n"
        "def j():\n    raise builtins.ValueError('x')\n"
    )
    assert [(n, f) for n, f, _ in _raised(tree)] == [
        ("ValueError", "f"),
        ("AttributeError", "__getattr__"),
        ("Foreign", "g"),
        ("argparse.ArgumentTypeError", "i"),
        ("builtins.ValueError", "j"),
    ]


@pytest.mark.parametrize(
    "call, kind",
    [
        (lambda: _validation.integer("n", True), ParameterTypeError),
        (lambda: _validation.integer("n", 1.0), ParameterTypeError),
        (lambda: _validation.integer("n", 0, at_least=1), ParameterValueError),
        (lambda: _validation.real("x", "1"), ParameterTypeError),
        (lambda: _validation.real("x", float("nan")), ParameterValueError),
        (lambda: _validation.real("x", float("inf")), ParameterValueError),
        (lambda: _validation.real("x", 0.0, above=0), ParameterValueError),
        (lambda: _validation.probability("q", 0.0, zero=False), ParameterValueError),
        (lambda: _validation.probability("q", 1.5), ParameterValueError),
        (lambda: _validation.boolean("b", 1), ParameterTypeError),
        (lambda: _validation.string("s", b"abc"), ParameterTypeError),
        (lambda: _validation.string("s", "", non_empty=True), ParameterValueError),
        (lambda: _validation.strings("s", "abc"), ParameterTypeError),
        (lambda: _validation.strings("s", ["a", 1]), ParameterTypeError),
        (lambda: _validation.strings("s", ["a", "a"], unique=True), ParameterValueError),
        (lambda: _validation.one_of("m", "x", {"a", "b"}), ParameterValueError),
    ],
)
def test_validation_raises_the_fitting_builtin_and_ours(call: object, kind: type) -> None:
    with pytest.raises(kind) as info:
        call()  # type: ignore[operator]
    assert isinstance(info.value, FlowerpetsError)
    assert isinstance(info.value, TypeError if kind is ParameterTypeError else ValueError)


def test_validation_returns_the_value_as_its_type() -> None:
    import numpy as np

    assert _validation.integer("n", np.int64(3), at_least=1) == 3
    assert type(_validation.integer("n", np.int64(3))) is int
    assert _validation.real("x", 2) == 2.0 and type(_validation.real("x", 2)) is float
    assert _validation.real("x", float("inf"), finite=False) == float("inf")
    assert _validation.probability("q", 1.0) == 1.0
    assert _validation.strings("s", ["a", "b"]) == ("a", "b")
    assert _validation.string("s", "", non_empty=False) == ""


def test_a_secret_value_stays_out_of_the_message() -> None:
    with pytest.raises(ParameterValueError) as info:
        _validation.real("clip", 0.123456, above=1, secret=True)
    assert "0.123456" not in str(info.value) and "clip" in str(info.value)


def test_fields_name_the_field_never_the_value() -> None:
    from flowerpets.core.fields import Fields
    from flowerpets.core.records import ConfigRecord, RecordDict

    content = RecordDict(
        {"p": ConfigRecord({"n": 5, "flag": True, "s": "secret-ish", "l": [1, 2]})}
    )
    fields = Fields.of(content, "p")
    assert fields.get("n", int) == 5 and fields.get("n", float) == 5.0
    assert fields.items("l", int) == [1, 2]
    assert fields.get("absent", int, 9) == 9
    for bad in (
        lambda: fields.get("flag", int),
        lambda: fields.get("s", int),
        lambda: fields.get("absent", int),
        lambda: fields.items("n", int),
        lambda: fields.text("s", {"a", "b"}),
        lambda: Fields.of(content, "q"),
    ):
        with pytest.raises(MessageFieldError) as info:
            bad()
        assert "secret-ish" not in str(info.value)

"""Every package face declares a sorted ``__all__`` whose names all exist."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import flowerpets

PACKAGES = [
    "flowerpets",
    *sorted(
        info.name
        for info in pkgutil.walk_packages(flowerpets.__path__, "flowerpets.")
        if info.ispkg and not info.name.rsplit(".", 1)[-1].startswith("_")
    ),
]

OPTIONAL = {"flowerpets.examples.digits": "sklearn", "flowerpets.flower": "flwr"}


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_complete(name: str) -> None:
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == sorted(exported), f"{name}.__all__ is not sorted"
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"


def test_core_is_re_exported_at_the_top() -> None:
    import flowerpets.core as core

    assert set(core.__all__) <= set(flowerpets.__all__)


def test_exceptions_module_is_flat_and_sorted() -> None:
    import flowerpets.exceptions as exceptions

    assert exceptions.__all__ == sorted(exceptions.__all__)
    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        assert issubclass(cls, exceptions.FlowerpetsError)

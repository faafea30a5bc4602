"""Package faces that import each name on first use (PEP 562 module ``__getattr__``).

Under Flower's deployment runtime every message to a node starts a fresh
``flwr-clientapp`` process that imports the app, so whatever a face imports is
paid per message. A lazy face keeps a node that uses one mod from importing the
rest of its package (the server's mod, the accountant, scipy, tenseal):

.. code-block:: python

    _HOMES = {"SecAggPlus": "server", "secaggplus_mod": "client"}   # name -> submodule
    __getattr__, __dir__ = lazy_face(__name__, _HOMES)

A name whose home is itself (``{"accountant": "accountant"}``) is that submodule.
Once loaded, a name is set on the package, so ``__getattr__`` runs once per name.
This module imports nothing from the rest of flowerpets, so any face may use it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_face"]


def lazy_face(
    package: str, homes: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose names live in ``homes``' submodules."""

    def __getattr__(name: str) -> Any:  # noqa: N807 - the protocol's name, as the face's
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{home}")
        value = module if home == name else getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted({*vars(sys.modules[package]), *homes})

    return __getattr__, __dir__

"""The SecAgg+ server never imports the client side (issue 10, items 2 and 6).

Both sides share their wire vocabulary through ``secagg/protocol.py``; a
server module that reached into a client module would tie the two back
together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import flowerpets.secagg

PACKAGE = Path(flowerpets.secagg.__file__).parent
SERVER = ("server.py", "_round.py")
CLIENT = {
    "flowerpets.secagg.client",
    "flowerpets.secagg._node_stages",
    "flowerpets.secagg._node_state",
}


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_server_module_imports_a_client_module() -> None:
    for name in SERVER:
        wrong = _imported(PACKAGE / name) & CLIENT
        assert not wrong, f"secagg/{name} imports {sorted(wrong)}"


def test_the_check_sees_a_client_import() -> None:
    assert "flowerpets.secagg.client" in _imported(PACKAGE / "__init__.py")

"""The HE docs name only mods that exist: every entry of every ``mods=[...]`` they show."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import flowerpets
import flowerpets.dp
import flowerpets.he

ROOT = Path(__file__).resolve().parents[2]
_IDENTIFIER = re.compile(r"\s*([A-Za-z_]\w*)")


def _texts() -> dict[str, str]:
    texts = {"docs/he.md": (ROOT / "docs" / "he.md").read_text()}
    for info in pkgutil.walk_packages(flowerpets.he.__path__, "flowerpets.he."):
        module = importlib.import_module(info.name)
        texts[info.name] = inspect.getsource(module)
    texts["flowerpets.he"] = inspect.getsource(flowerpets.he)
    return texts


def _mod_lists(text: str) -> list[str]:
    """The inside of every ``mods=[...]`` in ``text`` (brackets matched, not regex-guessed)."""
    found = []
    for match in re.finditer(r"mods=\[", text):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            depth += {"[": 1, "]": -1}.get(text[pos], 0)
            if depth == 0:
                found.append(text[start:pos])
                break
    return found


def _entries(inside: str) -> list[str]:
    """The leading name of each top-level entry (``CentralDp(...)`` -> ``CentralDp``)."""
    names, depth, current = [], 0, ""
    for char in [*inside, ","]:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            match = _IDENTIFIER.match(current)
            if match:
                names.append(match.group(1))
            current = ""
        else:
            current += char
    return names


KNOWN = {*flowerpets.__all__, *flowerpets.he.__all__, *flowerpets.dp.__all__}
TEXTS = _texts()


def test_the_scanner_finds_the_mod_lists() -> None:
    assert _entries("CKKSClientMod(encrypt=['w', 'b']), fixed_clipping_mod") == [
        "CKKSClientMod",
        "fixed_clipping_mod",
    ]
    assert _mod_lists("ClientApp(mods=[a(x=[1]), b])") == ["a(x=[1]), b"]
    assert sum(len(_mod_lists(t)) for t in TEXTS.values()) >= 5


@pytest.mark.parametrize("where", sorted(TEXTS))
def test_every_mod_the_he_docs_show_exists(where: str) -> None:
    text = TEXTS[where]
    defined = set(re.findall(r"def ([A-Za-z_]\w*)", text))  # a mod the example itself defines
    for inside in _mod_lists(text):
        for name in _entries(inside):
            assert name in KNOWN or name in defined, (
                f"{where} shows mods=[{inside}], but {name!r} is exported by none of "
                "flowerpets, flowerpets.he, flowerpets.dp"
            )

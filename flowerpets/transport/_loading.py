"""Loading ``module:attribute`` app specs and ``key=value`` configuration from the command line."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from typing import Any, Final

from flowerpets.core import ConfigValue
from flowerpets.exceptions import AppLoadError, ParameterValueError

__all__ = ["load_object", "parse_config", "parse_value"]

_INT: Final = re.compile(r"[+-]?\d+")
_FLOAT: Final = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


def load_object(spec: str) -> Any:
    """The object named by ``package.module:attribute`` (the attribute may be dotted)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ParameterValueError(f"an app is given as MODULE:ATTRIBUTE, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppLoadError(f"cannot import {module_name!r} (from {spec!r}): {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppLoadError(f"{module_name!r} has no attribute {attribute!r}") from None
    return target


def parse_value(text: str) -> ConfigValue:
    """``true``/``false`` -> bool, integers -> int, decimals -> float, anything else a string.

    Quote a value (``'"3"'``) to keep it a string.
    """
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def parse_config(items: Iterable[str]) -> dict[str, ConfigValue]:
    """``["key=value", ...]`` as a dict (later keys win), values as :func:`parse_value` says."""
    config: dict[str, ConfigValue] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParameterValueError(f"configuration is given as KEY=VALUE, got {item!r}")
        config[key] = parse_value(value.strip())
    return config

"""Runnable examples built on flowerpets."""

from __future__ import annotations

__all__: list[str] = []

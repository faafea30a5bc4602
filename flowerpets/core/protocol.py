"""The naming convention of every PET's wire vocabulary, and the base of its stages.

A PET owns one *namespace*, its short lowercase name (``secagg+``, ``he``, ``dp``),
and everything it puts on the wire or in a context is named under it:

* stage names (``Metadata.stage``) are ``<namespace>/<stage>``, the stage in
  kebab-case: ``secagg+/share-keys``, ``he/keygen``;
* keys it adds to another app's config record are ``<namespace>.<key>``:
  ``he.key-id``, ``dp.clip``;
* records it owns (in a message's content or a context's state) are named
  ``<namespace>`` or start with ``<namespace>/`` or ``<namespace>.``.

A PET declares its stages once, as a :class:`StageName` subclass in its
protocol module (``secagg/protocol.py``, ``he/protocol.py``), which its client
and its server both import. ``tests/core/test_naming.py`` checks every PET.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable

from flowerpets.exceptions import ParameterValueError

__all__ = ["NAMESPACE", "STAGE", "StageName", "check_stage_names"]

NAMESPACE = re.compile(r"[a-z][a-z0-9+]*")
"""A PET's namespace: lowercase letters, digits and ``+``."""

STAGE = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
"""A stage within its namespace: kebab-case."""


def check_stage_names(stages: Iterable[str]) -> str:
    """The namespace ``stages`` share; ValueError if one breaks the convention."""
    namespaces = set()
    for stage in stages:
        namespace, slash, name = stage.partition("/")
        if not (slash and NAMESPACE.fullmatch(namespace) and STAGE.fullmatch(name)):
            raise ParameterValueError(
                f"stage name {stage!r} is not '<namespace>/<kebab-case-stage>'"
            )
        namespaces.add(namespace)
    if len(namespaces) != 1:
        raise ParameterValueError(f"a PET's stages share one namespace, got {sorted(namespaces)}")
    return namespaces.pop()


class StageName(enum.StrEnum):
    """Base of a PET's stages: each member is ``<namespace>/<stage>``."""

    @classmethod
    def namespace(cls) -> str:
        """The PET's namespace (ValueError if a member breaks the convention)."""
        return check_stage_names(cls)

    @classmethod
    def prefix(cls) -> str:
        """``<namespace>/``: every stage of the PET starts with it."""
        return cls.namespace() + "/"

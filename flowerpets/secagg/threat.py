"""What each threat model changes in a SecAgg+ round: one table, read by both sides.

:class:`~flowerpets.secagg.protocol.Threat` names the model (on the wire, in
the round configuration); :data:`MODELS` says what it takes. The server mod and
the client mod read their behaviour from the row of their threat, never by
comparing names:

==============  ==========================  ===========================  ==============
threat          key advertisements          consistency check            identities
==============  ==========================  ===========================  ==============
semi-honest     unsigned                    no                           not needed
malicious       signed (Ed25519), verified  yes, before unmasking        required
==============  ==========================  ===========================  ==============

Both mods default to ``malicious`` when they are given identities (a PKI) and
to ``semi-honest`` when not; asking for ``malicious`` without identities is
refused when the mod is built, and asking for ``semi-honest`` despite them
warns. The threat reaches the parameter finder
(:mod:`flowerpets.secagg.parameters`) as its ``threat=`` keyword, which
chooses the rule the threshold must meet.

The malicious mode asks, on a sparse graph, for the cohort quorum by default
(:func:`quorum_setting`): a node unmasks only once ``floor((n + C) / 2) + 1``
other nodes of the cohort signed its survivor set. Turning it off
(``SecAggPlus(quorum=False)``, ``SecAggPlusClientMod(require_quorum=False)``)
warns: a server can then show far-apart parts of the ring different survivor
sets and learn the sum of a small block of honest nodes. The node's setting is
the one that protects it; the server's only says whether rounds ask for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from flowerpets._validation import boolean, one_of
from flowerpets.exceptions import ConfigurationError, ParameterTypeError
from flowerpets.secagg.protocol import Stage, Threat

__all__ = ["MODELS", "Threat", "ThreatModel", "quorum_setting", "resolve"]

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ThreatModel:
    """What a round under one threat model does (a row of :data:`MODELS`)."""

    threat: Threat
    signed: bool  # advertisements are signed, and verified against the identities
    stages: tuple[str, ...]  # the stages the server runs, in order

    @property
    def consistency_check(self) -> bool:
        return Stage.CONSISTENCY_CHECK in self.stages

    @property
    def needs_identities(self) -> bool:
        return self.signed


_SEMI_HONEST_STAGES = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_INPUT)

MODELS: Mapping[Threat, ThreatModel] = MappingProxyType(
    {
        Threat.SEMI_HONEST: ThreatModel(
            Threat.SEMI_HONEST, signed=False, stages=(*_SEMI_HONEST_STAGES, Stage.UNMASK)
        ),
        Threat.MALICIOUS: ThreatModel(
            Threat.MALICIOUS,
            signed=True,
            stages=(*_SEMI_HONEST_STAGES, Stage.CONSISTENCY_CHECK, Stage.UNMASK),
        ),
    }
)
"""Each threat model's row: the one mapping from a threat's name to what it does."""


def resolve(threat: Threat | str | None, *, has_identities: bool, who: str) -> ThreatModel:
    """The row for a mod's ``threat`` argument: None means malicious with identities,
    semi-honest without; malicious without identities is a ConfigurationError."""
    if threat is None:
        threat = Threat.MALICIOUS if has_identities else Threat.SEMI_HONEST
    if not isinstance(threat, str):
        raise ParameterTypeError(f"{who}: threat must be a str or a Threat, got {threat!r}")
    model = MODELS[Threat(one_of("threat", threat, {t.value for t in Threat}))]
    if model.needs_identities and not has_identities:
        raise ConfigurationError(
            f"{who}(threat={model.threat.value!r}) needs identities: the nodes' enrolled "
            "Ed25519 public keys (flowerpets.secagg.NodeIdentities); without them nothing binds "
            "a key to a node and a malicious server can impersonate any of them"
        )
    if has_identities and not model.needs_identities:
        warnings.warn(
            f"{who}(threat={model.threat.value!r}) with identities: they are not used, and a "
            "server that shows nodes different survivor lists can unmask a node's update "
            "(docs/secagg.md); threat='malicious' closes that",
            stacklevel=3,
        )
    return model


def quorum_setting(requested: bool | None, model: ThreatModel, *, who: str, name: str) -> bool:
    """Whether a mod asks for the cohort quorum: by default (None) exactly in the malicious
    mode; turning it off there warns, asking for it in the semi-honest mode (which has no
    signatures to count) is a ConfigurationError."""
    if requested is None:
        return model.consistency_check
    if boolean(name, requested) and not model.consistency_check:
        raise ConfigurationError(
            f"{who}({name}=True) needs the malicious mode: a semi-honest round has no "
            "survivor-set signatures for a quorum to count"
        )
    if not requested and model.consistency_check:
        warnings.warn(
            f"{who}({name}=False) in the malicious mode: a node then unmasks with its t "
            "neighbours' signatures of the survivor set alone, so on a sparse graph a server "
            "can show far-apart parts of the ring different survivor sets (a regional split "
            "view) and learn the exact sum of a small block of about k/2 + 2 honest nodes "
            "(docs/secagg.md); keep the default to refuse that",
            stacklevel=3,
        )
    return requested

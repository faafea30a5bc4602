"""The server side of SecAgg+: the server mod that runs a secure round over the Grid.

.. code-block:: python

    server = ServerApp(strategy=FedAvg(), num_rounds=10, initial_arrays=arrays,
                       mods=[SecAggPlus(dropout_rate=0.1, corrupted_fraction=0.1)])

:class:`SecAggPlus` holds the configuration and picks each round's degree and
threshold; it replaces the innermost exchange: it never calls ``call_next``,
and runs the round's stages (four, five in malicious mode) through ``context.require_grid()`` as one
:class:`~flowerpets.secagg._round.ServerRound` (the round's state machine, its
dropout handling and its result are described there).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import numpy as np

from flowerpets._validation import instance, integer, probability, real, strings
from flowerpets.core import RoundRequest, RoundResult, SecureAggregator, ServerContext
from flowerpets.exceptions import ParameterTypeError, ParameterValueError
from flowerpets.secagg._round import ServerPhase, ServerRound
from flowerpets.secagg.identity import NodeIdentities
from flowerpets.secagg.parameters import (
    MAX_BITS,
    GraphParameters,
    check_parameters,
    cohort_quorum,
    find_parameters,
)
from flowerpets.secagg.protocol import Threat
from flowerpets.secagg.threat import ThreatModel, quorum_setting, resolve

__all__ = ["SecAggPlus", "ServerPhase", "ServerRound"]

Randomness = Callable[[int], bytes]


class SecAggPlus(SecureAggregator):
    """The SecAgg+ server mod (Bell et al., CCS 2020), semi-honest or malicious.

    Keyword-only configuration:

    ``threat``
        ``"semi-honest"`` or ``"malicious"`` (:class:`~flowerpets.secagg.protocol.Threat`;
        by default malicious when ``identities`` are given, semi-honest otherwise).
        Malicious: nodes sign their keys with their identity keys and a
        consistency check precedes unmasking (docs/secagg.md); the degree and
        threshold are chosen for that threat.
    ``identities``
        The PKI (:class:`~flowerpets.secagg.NodeIdentities`), the same the nodes
        are given; required for ``threat="malicious"``. Nodes of the cohort it
        does not list are excluded from the round.
    ``quorum``
        Malicious mode: a node unmasks only once ``floor((n + C) / 2) + 1`` nodes of
        the whole cohort (``C = floor(corrupted_fraction * n)``) signed its survivor
        set, besides its ``t`` neighbours, so that every node that unmasks was shown
        one set (without it a server can show far-apart parts of a sparse ring
        different sets and learn a small block's sum; docs/secagg.md, regional
        views). About ``n / 2`` signature checks per node; a round fails when at most
        that many nodes survive to sign, which the parameter finder counts. Default:
        on in the malicious mode (``quorum=False`` warns, and nodes, which require it
        by default, refuse such rounds), off in the semi-honest one (``quorum=True``
        there is a ConfigurationError). The complete graph asks no quorum: its ``t``
        is already cohort-wide.

    ``degree``, ``threshold``
        The graph degree ``k`` and Shamir threshold ``t``, both or neither. By
        default they are found per round for the cohort size by
        :func:`~flowerpets.secagg.find_parameters` from ``dropout_rate`` (expected
        fraction of dropouts, default 0.1) and ``corrupted_fraction`` (fraction of
        nodes that may collude with the server, default 0.1), so that the round
        leaks more than the sum with probability at most ``2**-security_bits``
        and fails (with at most that many dropouts) with probability at most
        ``2**-correctness_bits`` (both 40 by default).
    ``clipping_range``
        Float values are clipped to ``[-clipping_range, clipping_range]`` before
        quantization (default 8.0); nodes that clip log a warning and are counted
        in the ``secagg-clipped-nodes`` metric. Integer values are never clipped.
    ``max_weight``
        The largest weight (``num-examples``) a node may report (default 10,000);
        sizes the quantization so that no sum can wrap. Unweighted rounds use 1.
    ``secure_metrics``
        Reply metrics summed under the masks, weighted like the update (default
        none: every reply metric is dropped).
    ``rng``
        A numpy generator for the graph's random ordering (tests); by default the
        OS's secure source.
    ``randomness``
        ``n -> n random bytes`` for the session id (default ``os.urandom``).
    """

    def __init__(
        self,
        *,
        degree: int | None = None,
        threshold: int | None = None,
        dropout_rate: float = 0.1,
        corrupted_fraction: float = 0.1,
        security_bits: int = 40,
        correctness_bits: int = 40,
        clipping_range: float = 8.0,
        max_weight: int = 10_000,
        secure_metrics: Iterable[str] = (),
        rng: np.random.Generator | None = None,
        randomness: Randomness = os.urandom,
        threat: Threat | str | None = None,
        identities: NodeIdentities | None = None,
        quorum: bool | None = None,
    ) -> None:
        if (degree is None) != (threshold is None):
            raise ParameterValueError(
                f"give both degree and threshold, or neither (got degree={degree!r}, "
                f"threshold={threshold!r})"
            )
        if degree is not None and threshold is not None:
            degree = integer("degree", degree, at_least=2)
            threshold = integer("threshold", threshold, at_least=2)
            if threshold > degree:
                raise ParameterValueError(f"threshold={threshold} must not exceed degree={degree}")
            if degree % 2:
                raise ParameterValueError(f"degree must be even (a Harary graph), got {degree}")
        self.dropout_rate = probability("dropout_rate", dropout_rate, one=False)
        self.corrupted_fraction = probability("corrupted_fraction", corrupted_fraction, one=False)
        self.security_bits = integer("security_bits", security_bits, at_least=1, at_most=MAX_BITS)
        self.correctness_bits = integer(
            "correctness_bits", correctness_bits, at_least=1, at_most=MAX_BITS
        )
        clipping_range = real("clipping_range", clipping_range, above=0)
        max_weight = integer("max_weight", max_weight, at_least=1)
        metrics = strings("secure_metrics", secure_metrics, unique=True, check=_metric_name)
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise ParameterTypeError(f"rng must be a numpy Generator or None, got {rng!r}")
        if not callable(randomness):
            raise ParameterTypeError(
                f"randomness must be callable as randomness(n) -> bytes, got {randomness!r}"
            )
        if identities is not None:
            instance("identities", identities, NodeIdentities)
        self.model: ThreatModel = resolve(
            threat, has_identities=identities is not None, who="SecAggPlus"
        )
        self.identities = identities
        self.degree = degree
        self.threshold = threshold
        self.clipping_range = float(clipping_range)
        self.max_weight = max_weight
        self.secure_metrics = metrics
        self.rng = rng
        self.randomness = randomness
        self.quorum = quorum_setting(quorum, self.model, who="SecAggPlus", name="quorum")

    def quorum_for(self, params: GraphParameters) -> int:
        """How many nodes of the cohort must sign a node's survivor set before it unmasks:
        with the quorum on (the malicious mode's default) on a sparse graph,
        ``floor((n + C) / 2) + 1`` with ``C = floor(corrupted_fraction * n)`` (two sets
        cannot both gather it from honest nodes, so every node that unmasks was shown one
        set); otherwise 0 (the ``t`` neighbours' signatures only, which the complete graph
        makes cohort-wide)."""
        if not self.quorum or params.is_complete:
            return 0
        return cohort_quorum(params.cohort_size, self.corrupted_fraction)

    def __repr__(self) -> str:
        opted_out = "" if self.quorum == self.model.consistency_check else ", quorum=False"
        graph = (
            f"degree={self.degree}, threshold={self.threshold}"
            if self.degree is not None
            else f"dropout_rate={self.dropout_rate}, corrupted_fraction={self.corrupted_fraction}"
        )
        return (
            f"SecAggPlus({graph}, clipping_range={self.clipping_range}, "
            f"max_weight={self.max_weight}, secure_metrics={self.secure_metrics!r}, "
            f"threat={self.threat.value!r}{opted_out})"
        )

    @property
    def threat(self) -> Threat:
        return self.model.threat

    def parameters(self, cohort_size: int) -> GraphParameters:
        """The degree and threshold this mod uses for a cohort of ``cohort_size``."""
        threat = self.model.threat
        if self.degree is not None and self.threshold is not None:
            chosen = check_parameters(cohort_size, self.degree, self.threshold, threat=threat)
            # The round asks the quorum for hand-picked values too: say so (and count it in
            # tolerated_dropouts and least_summed), as the finder's values do.
            return dataclasses.replace(chosen, quorum=self.quorum_for(chosen))
        return find_parameters(
            cohort_size,
            threat=threat,
            dropout_rate=self.dropout_rate,
            corrupted_fraction=self.corrupted_fraction,
            security_bits=self.security_bits,
            correctness_bits=self.correctness_bits,
            quorum=self.quorum if self.model.consistency_check else None,
        )

    def fewest_inputs(self, cohort_size: int) -> int:
        """The fewest masked inputs a sum this mod unmasks holds: ``t + 1`` for a cohort of
        ``cohort_size`` (the threshold ``t`` of :meth:`parameters`).

        Every survivor needs ``t`` surviving neighbours (docs/secagg.md), so a sum with
        fewer than ``t + 1`` inputs fails the round instead. Distributed DP sizes each
        node's noise share for this many.
        """
        return self.parameters(cohort_size).threshold + 1

    def __call__(
        self,
        request: RoundRequest,
        context: ServerContext,
        call_next: Callable[[RoundRequest, ServerContext], RoundResult],
    ) -> RoundResult:
        # call_next is deliberately not called: this mod is the round's exchange.
        return ServerRound(self, request, context.require_grid()).run()


def _metric_name(name: str) -> None:
    if not name:
        raise ParameterValueError("every item of secure_metrics must be a non-empty str")

"""The server mod: key set-up through the nodes, then a streaming sum of ciphertexts.

:class:`HomomorphicAggregation` replaces the innermost exchange of a round
(it does not call ``call_next``), so it must be the *last* server mod listed;
mods before it (central DP's noise) post-process its sealed result::

    from flowerpets.dp import CentralDp

    app = ServerApp(
        strategy=FedAvg(...),
        mods=[CentralDp(noise_multiplier=1.0, clipping_norm=0.5), HomomorphicAggregation()],
    )

(with ``fixed_clipping_mod`` on the clients: the server cannot clip what it cannot read).

Each round has two parts, each in its own module: the key set-up through the
nodes (:mod:`flowerpets.he._keysetup`) and the encrypted round itself
(:mod:`flowerpets.he._aggregation`). This module decides which arrays are
encrypted and puts the round's record together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from flowerpets._validation import instance, integer
from flowerpets.core import (
    SEALED_WEIGHT_KEY,
    DurableState,
    Error,
    ErrorCode,
    Failure,
    FailureKind,
    RoundRequest,
    RoundResult,
    SecureAggregator,
    ServerContext,
    is_sealed,
)
from flowerpets.exceptions import IncompatibleModsError, ModelMismatchError
from flowerpets.he._aggregation import ModelLayout, aggregate_encrypted
from flowerpets.he._durable import STATE_NAME, encode_state, restore_state
from flowerpets.he._keysetup import KeySetup
from flowerpets.he._primitives.packing import Layout, encryption_patterns, select_names
from flowerpets.he._primitives.params import COMPACT, CKKSParameters
from flowerpets.he.protocol import RESERVED_PREFIX, Stage

__all__ = ["HomomorphicAggregation"]

log = logging.getLogger(__name__)

Next = Callable[[RoundRequest, ServerContext], RoundResult]


class HomomorphicAggregation(SecureAggregator, DurableState):
    """Sums CKKS-encrypted updates; the server never holds a key that can decrypt.

    Before its first round (and whenever connected nodes lack the key) it runs
    the key set-up stages over ``context.grid`` (see :class:`~flowerpets.he.Stage`):
    one node generates the CKKS context and wraps its secret for every other
    node, the server relays, and keeps only the parameters. Then each round it
    sends the model to the cohort's key holders, adds every encrypted update to
    one running sum as it arrives (peak memory: the sum plus one update), sums
    the arrays left in the clear with the core's weighted sum, and returns a
    :class:`~flowerpets.core.RoundResult` whose ``sealed`` part is an
    :class:`~flowerpets.he.EncryptedSum`. A malformed or foreign update marks
    its node failed for the round; the others' sum is unaffected.

    ``encrypt`` lists the arrays to encrypt (exact names or globs; default all;
    a pattern matching nothing is an error). ``params`` is the CKKS parameter
    set (default :data:`~flowerpets.he.COMPACT`). ``max_keygen_attempts``
    bounds how many nodes are asked in turn to generate (or share) the key in
    one round before the round fails.

    With a run store (``ServerApp(..., store=writer)``) it commits, with every
    round, the key's public side (parameters, public context, key id, holders)
    and the sealed model's layout, never a key (:mod:`flowerpets.he._durable`). A
    resumed run continues from them without a new key set-up: its first round
    asks the nodes whether they still hold the key, and ends the run with
    :class:`~flowerpets.exceptions.KeyHoldersGoneError` if none does (a
    simulation's nodes die with its process; ``docs/he.md``, "A run resumed from
    a store").
    """

    def __init__(
        self,
        *,
        encrypt: Sequence[str] = ("*",),
        params: CKKSParameters = COMPACT,
        max_keygen_attempts: int = 3,
    ) -> None:
        self.encrypt = encryption_patterns(encrypt)
        self.params = instance("params", params, CKKSParameters)
        self.max_keygen_attempts = integer("max_keygen_attempts", max_keygen_attempts, at_least=1)
        self._warned_plain = False

    def __repr__(self) -> str:
        return (
            f"HomomorphicAggregation(encrypt={self.encrypt!r}, params={self.params.describe()!r})"
        )

    # -- its state in a run store --------------------------------------------------------------
    @property
    def state_name(self) -> str:
        return STATE_NAME

    def durable_state(self, context: ServerContext) -> bytes:
        """The key's public side and the model's layout, with the settings they were made under."""
        return encode_state(context, self.params, self.encrypt)

    def restore(self, context: ServerContext, state: bytes | None, *, round: int) -> None:
        """Continue the stored key state (its holders asked again at the next round), or refuse.

        Raises :class:`~flowerpets.exceptions.StoredKeyStateError` if the state is
        missing although rounds were committed, cannot be read, or was made
        under other parameters or encryption patterns.
        """
        restore_state(context, state, round=round, params=self.params, encrypt=self.encrypt)

    # -- one round -----------------------------------------------------------------------------
    def __call__(
        self, request: RoundRequest, context: ServerContext, call_next: Next
    ) -> RoundResult:
        # CKKS sums approximate reals: it cannot sum residues modulo a power of two.
        request.refuse_quantized("HomomorphicAggregation")
        grid = context.require_grid()
        model = self._model(request, context)
        setup = KeySetup(grid, request, params=self.params, max_attempts=self.max_keygen_attempts)
        keys = setup.run(request, context)
        holders = set(keys.holders)
        keyed = [node for node in request.cohort if node in holders]
        result = aggregate_encrypted(request, grid, keys, model, keyed)
        failures = dict(result.failures)
        no_key = Failure(
            Stage.INSTALL,
            Error(ErrorCode.REFUSED, "the node holds no CKKS key"),
            FailureKind.EXCLUDED,
        )
        for node in request.cohort:
            if node not in holders:
                failures[node] = setup.failures.get(node, no_key)
        return result.replace(failures=failures)

    # -- the model's layout --------------------------------------------------------------------
    def _model(self, request: RoundRequest, context: ServerContext) -> ModelLayout:
        stored = ModelLayout.load(context.state)
        if is_sealed(request.arrays):
            if stored is None:
                # Every later round would fail alike (and commit as failed): end the run. (A run
                # resumed from a store has its layout back from the store: see restore.)
                raise IncompatibleModsError(
                    f"round {request.round}: the model is sealed, but this server never saw it "
                    "in the clear: HomomorphicAggregation must run from the first round (or "
                    "resume from the run store its state was committed to)"
                )
            return stored
        names = list(request.arrays)
        reserved = [n for n in names if n.startswith(RESERVED_PREFIX) or n == SEALED_WEIGHT_KEY]
        if reserved:
            raise ModelMismatchError(
                f"model arrays {reserved} use names reserved for the HE wire format"
            )
        model = ModelLayout(
            order=tuple(names),
            layout=Layout.of(request.arrays, select_names(names, self.encrypt)),
        )
        if model.plain and not self._warned_plain:
            self._warned_plain = True
            log.warning(
                "HomomorphicAggregation: %s are aggregated in the clear; the server sees each "
                "node's values of them",
                list(model.plain),
            )
        model.store(context.state)
        return model

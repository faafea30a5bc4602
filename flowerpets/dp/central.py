"""Central differential privacy for federated averaging (user-level DP-FedAvg).

:class:`CentralDp` is a server mod. Each round it

1. works out the round's privacy event from the sampling the strategy really
   used (``request.sampling``: Poisson, fixed-size without replacement, or full
   participation; see :func:`~flowerpets.dp.accountant.event_for_round`) and,
   given a budget, refuses the round *before any node sees it* if composing the
   event would exceed the budget (``StopRunError``: the ServerApp ends the run
   and returns what it has, with the reason in ``RunResult.stopped``);
2. asks for uniform weights (``request.weight_key = None``) and, when the
   clients clip, sends the clip in the config (``dp.clip``);
3. lets the inner chain collect the **sum of clipped updates** (each update is
   new weights minus the global weights, clipped to L2 norm C by the client
   mods in :mod:`flowerpets.dp.clipping`, or by this mod when it clips on the
   server);
4. adds Gaussian noise of standard deviation ``z C`` to that sum, adds back
   ``m`` times the global model, and sets the total weight to ``m``, the
   *expected* cohort size ``request.sampling.expected_size(request.population)``,
   so FedAvg's mean is exactly

       w + (sum of clipped updates + N(0, (z C)^2)) / m,

   the fixed-denominator estimator of McMahan et al. (ICLR 2018), whose noise
   on the mean is ``z C / m``;
5. records the event with the accountant and reports ``epsilon`` (at
   ``delta``) in the round's metrics (``history.round(n).train_metrics``).

The run's privacy state (the ledger of events with their counts, and the clip)
lives in the run's context, ``context.state["dp.central"]``, as explicit JSON
events in a record written by :class:`~flowerpets.core.state.StateSlot`; the
accountant, the epsilon spent and the rounds counted are derived from the ledger. The mod keeps
nothing per run, so one instance serves any number of runs, and a run's budget
is never forgotten while its context lives. A ledger it cannot read stops the
run (``StopRunError``) rather than restart the budget.

The noise is added through :meth:`RoundResult.add_to_sum`, so it works on a
plain sum and on a sealed one (homomorphic encryption) alike.

**Fewer replies than expected.** The denominator stays ``m`` and the noise stays
``z C``: both depend on the clip, not on who replied, so the privacy guarantee
and the accountant's event are unchanged. What changes is utility: with ``m'``
replies the mean update is scaled by about ``m' / m``, so the model moves less
(towards the previous one) and the noise weighs relatively more. Dividing by
``m'`` instead would make the release depend on the number of participants,
which is exactly what DP must not reveal. A round in which nobody replied
(an empty Poisson cohort, say) still releases ``w + noise / m``: the result is
marked ``fixed_denominator``, so FedAvg does not fail it for having fewer than
``min_nodes`` participants, which would reveal how many replied. (An inner
exchange that needs a quorum, SecAgg+'s, still fails a round that is too small
for it; that fact is outside the accounting.)

**Adaptive clipping** (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021):
each client reports ``b_i - 1/2`` with ``b_i = 1`` if its update's norm was at
most ``C`` (*unclipped*, not clipped); the server adds N(0, sigma_b^2) to the
sum (default ``sigma_b = m / 20``), estimates the unclipped fraction
``b = (sum + noise) / m + 1/2`` and sets ``C <- C exp(-eta (b - gamma))``. The
two noises share the budget: the update's multiplier is
``z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (requires ``2 sigma_b > z``), and the
pair is accounted as one Gaussian of multiplier ``z``.

**Where the clipping happens.** ``ClipOn.CLIENTS`` (default) has each
client run a clipping mod, and composes with secure aggregation: the
clipped update (and the indicator, in the reserved array ``dp.unclipped``)
are summed securely and the server noises only the sum. Without secure
aggregation the server checks every reply before it is summed: a reply whose
norm exceeds the clip it sent (a client without a clipping mod replies with its
weights), or whose indicator is not +-1/2, is refused and recorded as that
node's ``INVALID_REPLY`` failure, with a reason that carries no value of the
reply. Under secure aggregation (or with a sealed model) the server sees only
the sum and cannot check: it trusts every client to clip, and one client that
does not can move the model as far as it likes, the noise notwithstanding.
``ClipOn.SERVER`` needs every update one by one, so it refuses to run when an
app's mod declares secure aggregation, or when the sum comes back sealed.

What it does not protect: the clients' own train metrics (loss, number of
examples) are averages of private data released without noise, so this mod
drops every metric the inner chain returns from the round's metrics unless
``keep_client_metrics=True``. The
number of available nodes (hence ``m``) is treated as public, as is the
fact that a round failed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, get_args

import numpy as np

from flowerpets._validation import boolean, instance, integer, probability, real
from flowerpets.core import (
    ArrayRecord,
    ConfigRecord,
    Error,
    ErrorCode,
    FixedSizeSampling,
    FullParticipation,
    Grid,
    Message,
    MetricRecord,
    RoundRequest,
    RoundResult,
    ServerContext,
)
from flowerpets.core.round import is_sealed
from flowerpets.core.state import StateSlot, convert
from flowerpets.dp._primitives.calibration import split_noise_multiplier
from flowerpets.dp._primitives.clip import clip_update, enforce_clip, update_between
from flowerpets.dp._primitives.noise import GaussianSource, lazy_gaussian_source
from flowerpets.dp._protocol import CLIP_KEY, INDICATOR, REPLY_MODEL_KEY, RESERVED_PREFIX
from flowerpets.dp.accountant import (
    Accountant,
    AccountantFactory,
    PrivacyEvent,
    default_accountant,
    default_neighbouring,
    event_for_round,
)
from flowerpets.exceptions import (
    FlowerpetsError,
    IncompatibleModsError,
    InvalidUpdateError,
    ModelMismatchError,
    ParameterTypeError,
    ParameterValueError,
    RecordTypeError,
    RoundFailedError,
    StateError,
    StateTypeError,
    StopRunError,
)

__all__ = ["AdaptiveClipping", "CentralDp", "ClipOn"]

log = logging.getLogger(__name__)

CallNext = Callable[[RoundRequest, ServerContext], RoundResult]
STATE_KEY = "dp.central"

# Samplings whose cohort is drawn without looking at the data and of a size fixed in advance.
_COHORT_FIXED_IN_ADVANCE = frozenset({FullParticipation, FixedSizeSampling})


class ClipOn(Enum):
    """Where updates are clipped under :class:`CentralDp`."""

    CLIENTS = "clients"  # each client runs fixed_clipping_mod or adaptive_clipping_mod
    SERVER = "server"  # the server clips each update it receives (no secure aggregation)


@dataclass(frozen=True, slots=True)
class AdaptiveClipping:
    """Adaptive clipping's settings (Andrew et al., 2021); defaults are the paper's.

    ``target_quantile`` (gamma): the fraction of updates the clip should leave
    unclipped. ``learning_rate`` (eta): the geometric step, ``C <- C exp(-eta (b -
    gamma))``. ``count_stddev`` (sigma_b): the noise on the unclipped count; None
    means ``m / 20`` for an expected cohort of ``m``.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        probability("target_quantile", self.target_quantile)
        real("learning_rate", self.learning_rate, above=0)
        if self.count_stddev is not None:
            real("count_stddev", self.count_stddev, above=0)

    def count_noise(self, expected_cohort: float) -> float:
        """sigma_b for an expected cohort of ``expected_cohort`` clients."""
        return self.count_stddev if self.count_stddev is not None else expected_cohort / 20.0

    def next_clip(self, clip: float, unclipped_fraction: float) -> float:
        """The geometric update ``C exp(-eta (b - gamma))``."""
        return clip * math.exp(-self.learning_rate * (unclipped_fraction - self.target_quantile))


# -- where the clipping happens -------------------------------------------------------------------
class _RefusedError(FlowerpetsError):
    """A reply the server refuses; the message is the reason the node's failure records."""


# Replies pass through one of these: (node, reply arrays) -> the arrays the inner chain sums.
_Check = Callable[[int, ArrayRecord], ArrayRecord]


class _CheckingGrid:
    """A Grid that passes every plain train reply of one round through ``check``.

    The inner chain then sums what ``check`` returned; a reply it refuses
    (``_RefusedError``) becomes an ``INVALID_REPLY`` error, so the inner exchange records
    the node's failure with the reason. A reply ``check`` cannot read
    (``InvalidUpdateError``, ``RecordTypeError``) passes unchanged: the inner
    exchange refuses it too. ``seen`` holds the nodes whose reply was checked.
    """

    def __init__(self, grid: Grid, request: RoundRequest, check: _Check) -> None:
        self._grid, self._request, self._check = grid, request, check
        self.seen: set[int] = set()

    @property
    def run_id(self) -> int:
        return self._grid.run_id

    def node_ids(self) -> Sequence[int]:
        return self._grid.node_ids()

    def send_and_receive(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            yield self._checked(reply)

    def _checked(self, reply: Message) -> Message:
        md = reply.metadata
        body = reply.content
        if (
            body is None
            or "arrays" not in body
            or md.message_type != self._request.message_type
            or md.round != self._request.round
            or md.stage
        ):
            return reply
        try:
            arrays = self._check(md.src_node_id, body.get_typed("arrays", ArrayRecord))
        except _RefusedError as exc:
            log.warning("round %d: refused node %d's reply: %s", md.round, md.src_node_id, exc)
            return Message(metadata=md, error=Error(ErrorCode.INVALID_REPLY, str(exc)))
        except (InvalidUpdateError, RecordTypeError):
            return reply  # the inner exchange refuses it and records the node's failure
        self.seen.add(md.src_node_id)
        content = body.copy()
        content["arrays"] = arrays
        return Message(metadata=md, content=content)


def _over(context: ServerContext, grid: _CheckingGrid) -> ServerContext:
    """``context`` with its Grid replaced by ``grid``."""
    return ServerContext(
        grid=grid,
        secure_aggregation=context.secure_aggregation,
        run_id=context.run_id,
        run_config=context.run_config,
        state=context.state,
    )


def _refuse_bypass(result: RoundResult, seen: Collection[int], what: str) -> None:
    """Refuses a result whose participants' replies did not all pass through ``what``."""
    missed = [node for node in result.participants if node not in seen]
    if missed:
        raise IncompatibleModsError(
            f"the updates of nodes {missed[:5]} did not pass through {what}: an inner mod "
            "runs its own exchange; clip on the clients, under secure aggregation, instead"
        )


_NOT_CLIPPED = (
    "the update's L2 norm exceeds the clip the server sent ('dp.clip'): the node did not clip "
    "it (is its DP clipping mod installed?)"
)


def _client_check(request: RoundRequest, clip: float, adaptive: bool) -> _Check:
    """The server's check of each client-clipped reply (possible without secure aggregation).

    The reply must be a clipped update: real-valued, of norm at most the clip,
    and with adaptive clipping an indicator of exactly +-1/2. A client that did
    not clip (no clipping mod: it sends its new weights) is refused, so it
    cannot move the model beyond what the noise was calibrated for. The reason
    names what was wrong, never the norm.
    """
    dtypes = {n: a.dtype for n, a in request.arrays.items() if n != INDICATOR}

    def check(node: int, arrays: ArrayRecord) -> ArrayRecord:
        if [n for n in arrays if n != INDICATOR] != list(dtypes):
            raise InvalidUpdateError("names differ from the model's")  # the exchange refuses it
        update: dict[str, np.ndarray] = {}
        for name in dtypes:
            data = arrays[name].numpy()
            if data.dtype.kind not in "biuf":
                raise _RefusedError(f"array {name!r} of the update is not real-valued")
            if not np.isfinite(np.add.reduce(data, axis=None, dtype=np.float64)):
                raise InvalidUpdateError("not finite")  # the exchange refuses it
            update[name] = data
        kept = enforce_clip(update, clip, dtypes=dtypes)
        if kept is None:
            raise _RefusedError(_NOT_CLIPPED)
        out = ArrayRecord.from_numpy(kept, copy=False)
        if adaptive:
            bit = arrays[INDICATOR].numpy() if INDICATOR in arrays else None
            if bit is None or bit.shape != (1,) or float(bit[0]) not in (-0.5, 0.5):
                raise _RefusedError(
                    f"the unclipped indicator {INDICATOR!r} must be one value, -1/2 or +1/2"
                )
            out[INDICATOR] = np.array([float(bit[0])])
        return out

    return check


def _on_clients(
    request: RoundRequest, context: ServerContext, call_next: CallNext, clip: float, adaptive: bool
) -> tuple[RoundResult, float]:
    config = ConfigRecord(request.config)
    config[CLIP_KEY] = clip
    arrays = ArrayRecord(request.arrays)
    if adaptive:
        arrays[INDICATOR] = np.zeros(1)
    inner = request.replace(config=config, arrays=arrays)
    if context.secure_aggregation or is_sealed(request.arrays) or context.grid is None:
        # The server sees only the sum (or replies holding a model it cannot read): it cannot
        # check each client's clipping, and trusts it (see docs/dp.md).
        result = call_next(inner, context)
    else:
        grid = _CheckingGrid(context.grid, inner, _client_check(inner, clip, adaptive))
        result = call_next(inner, _over(context, grid))
        if result.sealed is None:  # a sealed sum cannot be checked: it is a secure sum
            _refuse_bypass(result, grid.seen, "the server's check of each client's clipping")
    if not adaptive:
        return result, 0.0
    if INDICATOR not in result.aggregate:
        if result.participants:
            raise IncompatibleModsError(
                "adaptive clipping needs the unclipped count in the clear, but the round's sum "
                "holds no plain 'dp.unclipped' array (is it sealed by an inner mod?)"
            )
        return result, 0.0
    count = float(np.sum(result.aggregate[INDICATOR].numpy(), dtype=np.float64))
    aggregate = ArrayRecord({n: a for n, a in result.aggregate.items() if n != INDICATOR})
    return result.replace(aggregate=aggregate), count


def _server_clip(request: RoundRequest, clip: float, unclipped: dict[int, bool]) -> _Check:
    """Server-side clipping: each reply's update (reply minus model) clipped to ``clip``."""
    dtypes = {n: a.dtype for n, a in request.arrays.items()}

    def check(node: int, arrays: ArrayRecord) -> ArrayRecord:
        clipped = clip_update(update_between(arrays, request.arrays), clip, dtypes=dtypes)
        unclipped.setdefault(node, clipped.unclipped)
        return ArrayRecord.from_numpy(clipped.arrays, copy=False)

    return check


def _on_server(
    request: RoundRequest, context: ServerContext, call_next: CallNext, clip: float, adaptive: bool
) -> tuple[RoundResult, float]:
    if context.secure_aggregation:
        raise IncompatibleModsError(
            "CentralDp(clip_on=ClipOn.SERVER) needs every update one by one, but a mod of this "
            "app sums them securely: clip on the clients instead (ClipOn.CLIENTS)"
        )
    unclipped: dict[int, bool] = {}
    grid = _CheckingGrid(context.require_grid(), request, _server_clip(request, clip, unclipped))
    result = call_next(request, _over(context, grid))
    if result.sealed is not None:
        raise IncompatibleModsError(
            "CentralDp(clip_on=ClipOn.SERVER) cannot clip updates that an inner mod sealed"
        )
    _refuse_bypass(result, unclipped, "server-side clipping")
    count = sum(0.5 if unclipped[node] else -0.5 for node in result.participants)
    return result, float(count)


_SITES: dict[
    ClipOn,
    Callable[[RoundRequest, ServerContext, CallNext, float, bool], tuple[RoundResult, float]],
] = {ClipOn.CLIENTS: _on_clients, ClipOn.SERVER: _on_server}


# -- the mod --------------------------------------------------------------------------------------
_EVENT_TYPES: dict[str, type] = {cls.__name__: cls for cls in get_args(PrivacyEvent)}

Ledger = tuple[tuple[PrivacyEvent, int], ...]


def _ledger_texts(ledger: Ledger) -> list[str]:
    """Each distinct event and its count as explicit JSON, the form it takes in the run state."""
    return [
        json.dumps(
            {
                "count": count,
                "event": {"type": type(event).__name__, **_fields(event)},
            },
            sort_keys=True,
        )
        for event, count in ledger
    ]


def _fields(event: PrivacyEvent) -> dict[str, Any]:
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}


def _ledger_from_texts(texts: Any) -> Ledger:
    if not isinstance(texts, list):
        raise StateTypeError("the ledger is a list of JSON texts")
    ledger = []
    for text in texts:
        entry = json.loads(text)
        fields = dict(entry["event"])
        cls = _EVENT_TYPES[fields.pop("type")]
        ledger.append((cls(**fields), entry["count"]))
    return tuple(ledger)


@dataclass(frozen=True, slots=True)
class _Run:
    """One run's privacy state, kept in the run's context (``context.state["dp.central"]``).

    The ledger (each distinct event with its count) and the clip are the state;
    the accountant, the epsilon spent and the number of rounds are derived from
    the ledger. Nothing lives in the mod, so one CentralDp may serve any number of
    runs, and a run's budget lasts as long as its context.
    """

    clip: float
    ledger: Ledger = field(default=(), metadata=convert(_ledger_texts, _ledger_from_texts))

    def __post_init__(self) -> None:
        # A negative or infinite clip would scale the noise with it: never continue on one.
        real("the clip", self.clip, above=0, secret=True)  # adaptive clipping learns it from data
        for _, count in self.ledger:
            integer("a ledger count", count, at_least=1)
        if len({event for event, _ in self.ledger}) != len(self.ledger):
            raise ParameterValueError("the ledger lists an event twice")

    @property
    def rounds(self) -> int:
        return sum(count for _, count in self.ledger)


_SLOT = StateSlot(_Run, STATE_KEY)


class CentralDp:
    """Server mod: user-level central DP for FedAvg (see the module docstring).

    ``noise_multiplier`` (z) is the total: with adaptive clipping it covers the
    update and the unclipped count together. ``clipping_norm`` is C (the initial
    C with adaptive clipping). ``delta`` is the delta at which epsilon is
    reported; ``max_epsilon`` is the budget (None: report, never refuse).
    ``accountant`` makes a fresh accountant for a neighbouring relation (None:
    PLD, or RDP for fixed-size cohorts; see
    :func:`~flowerpets.dp.accountant.default_accountant`). ``rng`` replaces the
    secure noise source with a seeded generator, for tests only (it warns).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        clip_on: ClipOn = ClipOn.CLIENTS,
        adaptive: AdaptiveClipping | None = None,
        delta: float = 1e-5,
        max_epsilon: float | None = None,
        accountant: AccountantFactory | None = None,
        rng: np.random.Generator | None = None,
        keep_client_metrics: bool = False,
    ) -> None:
        self.noise_multiplier = real("noise_multiplier", noise_multiplier, at_least=0)
        self.clipping_norm = real("clipping_norm", clipping_norm, above=0)
        self.clip_on = instance("clip_on", clip_on, ClipOn)
        if adaptive is not None:
            adaptive = instance("adaptive", adaptive, AdaptiveClipping)
            if self.noise_multiplier == 0:
                raise ParameterValueError(
                    "adaptive clipping splits the noise: it needs noise_multiplier > 0"
                )
        self.adaptive = adaptive
        self.delta = probability("delta", delta, zero=False, one=False)
        if max_epsilon is not None:
            max_epsilon = real("max_epsilon", max_epsilon, above=0)
        self.max_epsilon = max_epsilon
        if accountant is not None and not callable(accountant):
            raise ParameterTypeError(
                f"accountant must make an Accountant, got {type(accountant).__name__}"
            )
        self.accountant = accountant
        self.keep_client_metrics = boolean("keep_client_metrics", keep_client_metrics)
        # The secure source is built on first use and never pickled: the mod pickles.
        self._noise: GaussianSource = lazy_gaussian_source(rng, owner="CentralDp")
        if self.noise_multiplier == 0:
            warnings.warn(
                "CentralDp(noise_multiplier=0) adds no noise: the run is not private "
                "(epsilon is infinite)",
                UserWarning,
                stacklevel=2,
            )
        if keep_client_metrics:
            warnings.warn(
                "CentralDp(keep_client_metrics=True) releases the clients' train metrics "
                "without noise: they are not covered by the privacy guarantee",
                UserWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return (
            f"CentralDp(noise_multiplier={self.noise_multiplier}, clipping_norm="
            f"{self.clipping_norm}, clip_on={self.clip_on.name}, adaptive={self.adaptive}, "
            f"delta={self.delta}, max_epsilon={self.max_epsilon})"
        )

    # -- per-run state --------------------------------------------------------------------------
    def _load(self, context: ServerContext) -> _Run:
        """This run's state from its context; only a context with no record starts a new run.

        State that cannot be read stops the run: continuing would forget the budget spent.
        """
        try:
            return _SLOT.get(context.state, _Run(clip=self.clipping_norm))
        except StateError as exc:
            raise StopRunError(
                f"the run's {STATE_KEY!r} state is unreadable ({exc}): CentralDp will not "
                "continue a run whose privacy ledger it cannot read"
            ) from None

    def spent(self, context: ServerContext) -> float:
        """The epsilon (at ``delta``) this mod has spent in the run ``context`` belongs to."""
        run = self._load(context)
        return (
            self._accountant_for(run, run.ledger[0][0]).get_epsilon(self.delta)
            if run.ledger
            else 0.0
        )

    def _accountant_for(self, run: _Run, event: PrivacyEvent) -> Accountant:
        """The run's accountant, derived from its ledger (``event`` chooses it in a new run)."""
        first = run.ledger[0][0] if run.ledger else event
        accountant = (
            default_accountant(first)
            if self.accountant is None
            else self.accountant(neighbouring=default_neighbouring(first))
        )
        for past, count in run.ledger:
            accountant.compose(past, count)
        return accountant

    def _account(self, run: _Run, event: PrivacyEvent, round: int) -> tuple[_Run, float]:
        """``run`` with ``event`` composed, and its epsilon; refuses a round over the budget."""
        accountant = self._accountant_for(run, event)
        before = accountant.copy()
        epsilon = accountant.compose(event).get_epsilon(self.delta)
        if self.max_epsilon is not None and epsilon > self.max_epsilon:
            raise StopRunError(
                f"privacy budget: round {round} would raise epsilon to {epsilon:.4g} at "
                f"delta={self.delta:g}, above max_epsilon={self.max_epsilon:g} "
                f"(spent {before.get_epsilon(self.delta):.4g} in {run.rounds} round(s))"
            )
        return dataclasses.replace(run, ledger=tuple(accountant.ledger.items())), epsilon

    # -- one round -------------------------------------------------------------------------------
    def __call__(
        self, request: RoundRequest, context: ServerContext, call_next: CallNext
    ) -> RoundResult:
        if request.population < 1:
            raise RoundFailedError(f"round {request.round}: no nodes are available")
        sealed_model = is_sealed(request.arrays)
        if sealed_model:
            self._check_sealed_model(request)
        reserved = [n for n in (*request.arrays, *request.config) if n.startswith(RESERVED_PREFIX)]
        if reserved:
            raise ModelMismatchError(
                f"names {reserved} are reserved for the DP mods ({RESERVED_PREFIX}*)"
            )
        run = self._load(context)
        expected = float(request.sampling.expected_size(request.population))
        if run.rounds == 0 and self.delta >= 1.0 / request.population:
            log.warning(
                "CentralDp: delta=%g is not below 1/population (%d nodes): such a delta allows "
                "releasing one client's data outright",
                self.delta,
                request.population,
            )
        update_multiplier, count_stddev = self.noise_multiplier, 0.0
        if self.adaptive is not None:
            count_stddev = self.adaptive.count_noise(expected)
            update_multiplier = split_noise_multiplier(self.noise_multiplier, count_stddev)
        event = event_for_round(request.sampling, request.population, self.noise_multiplier)
        run, epsilon = self._account(run, event, request.round)
        _SLOT.store(context.state, run)  # accounted before any node sees the round

        clip = run.clip
        site = _SITES[self.clip_on]
        inner = request.replace(weight_key=None)
        if sealed_model:
            inner = inner.replace(config=ConfigRecord({**request.config, REPLY_MODEL_KEY: True}))
        result, unclipped = site(inner, context, call_next, clip, self.adaptive is not None)
        if sealed_model:
            result = self._noised_models(result, update_multiplier * clip)
        else:
            result = self._noised(result, request.arrays, update_multiplier * clip, expected)

        metrics = MetricRecord(result.metrics) if self.keep_client_metrics else MetricRecord()
        metrics["epsilon"] = epsilon
        metrics["delta"] = self.delta
        metrics["dp-clip"] = clip
        metrics["dp-noise-std"] = update_multiplier * clip / result.total_weight
        metrics["dp-expected-cohort"] = expected
        if self.adaptive is not None:
            noisy = unclipped + float(self._noise.normal(count_stddev, (1,))[0])
            fraction = noisy / expected + 0.5
            run = dataclasses.replace(run, clip=self.adaptive.next_clip(clip, fraction))
            metrics["dp-unclipped-fraction"] = fraction
            _SLOT.store(context.state, run)
        return result.replace(metrics=metrics)

    def _check_sealed_model(self, request: RoundRequest) -> None:
        """A sealed global model is supported only where the number of replies is public."""
        if self.clip_on is ClipOn.SERVER:
            raise IncompatibleModsError(
                "CentralDp(clip_on=ClipOn.SERVER) cannot compute updates against a global model "
                "it cannot read (it is sealed): clip on the clients instead"
            )
        if type(request.sampling) not in _COHORT_FIXED_IN_ADVANCE:
            raise IncompatibleModsError(
                f"with a sealed global model CentralDp divides by the number of replies, which "
                f"{request.sampling!r} makes private: use FullParticipation or FixedSizeSampling"
            )

    def _noised_models(self, result: RoundResult, std: float) -> RoundResult:
        """The sealed-model variant: the replies are models, so the mean divides by their count.

        The server cannot add ``m`` times a model it cannot read. Each client sent
        ``received + clipped update`` instead, so the sum holds ``m'`` copies of
        the model, and the denominator must be ``m'``, the number of replies. That
        is post-processing of the noised sum only if ``m'`` is public: true when the
        cohort is fixed in advance and dropping out does not depend on the data,
        which is why Poisson sampling is refused here.
        """
        if not result.participants:
            raise RoundFailedError(
                f"round {result.round}: no node replied", failures=result.failures
            )
        noise = {name: self._noise.normal(std, shape) for name, shape in result.shapes().items()}
        return result.add_to_sum(noise).replace(total_weight=float(len(result.participants)))

    def _noised(
        self, result: RoundResult, model: ArrayRecord, std: float, expected: float
    ) -> RoundResult:
        """``result`` with N(0, std^2) and ``expected * model`` added, total weight ``expected``."""
        if result.sealed is None and any(name not in result.aggregate for name in model):
            # Nobody replied: the release is still the model plus noise, as the DP analysis says.
            aggregate = ArrayRecord(result.aggregate)
            for name, array in model.items():
                if name not in aggregate:
                    aggregate[name] = np.zeros(array.shape)
            result = result.replace(aggregate=aggregate)
        additions: dict[str, Any] = {}
        for name, array in model.items():
            noise = self._noise.normal(std, array.shape)
            noise += expected * np.asarray(array.numpy(), dtype=np.float64)
            additions[name] = noise
        # The release is w + (sum + noise) / m whoever replied, none included: FedAvg must not
        # fail the round for too few replies (min_nodes), which would reveal how many replied.
        return result.add_to_sum(additions).replace(total_weight=expected, fixed_denominator=True)

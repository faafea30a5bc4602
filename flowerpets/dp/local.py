"""Local differential privacy: each client noises its own update before it leaves the node.

:class:`LocalDpMod` is a client mod. On every train request it lets the
handler train, computes the update (new weights minus received weights),
clips it to L2 norm ``C``, adds N(0, sigma^2) to every coordinate, and replies
with ``received + noised update``, so an unmodified FedAvg server averages
private updates. The server is not trusted: what it receives is already
(epsilon, delta)-DP with respect to this client's data.

Calibration. ``sigma`` comes from the analytic Gaussian mechanism (Balle and
Wang, ICML 2018), which is exact for every epsilon, and the sensitivity is
not a free parameter: it follows from the clip and the neighbouring relation,
``2C`` under :attr:`~flowerpets.dp.accountant.Neighbouring.REPLACE_ONE` (the
default, and the usual meaning of local DP: any two datasets of this client
give indistinguishable updates) or ``C`` under ``ADD_OR_REMOVE`` (this
client's data against none at all).

Across rounds. Each round is one Gaussian mechanism with noise multiplier
``z = sigma / sensitivity``; T of them compose exactly to one Gaussian with
multiplier ``z / sqrt(T)``. The node's state (``context.state["dp.local"]``,
written by :class:`~flowerpets.core.state.StateSlot`) keeps the rounds spent
and their summed precision ``sum z^-2``, from which the composed epsilon at
``delta`` is derived; with ``max_epsilon`` the node refuses (``REFUSED``) a
round that would exceed it, and a state it cannot read refuses every round
(the budget is never forgotten). The mod itself keeps no per-run state: one
instance serves any number of nodes, and it pickles (its secure noise source
is built on first use, and a copy builds its own).

With a run store. The budget lives on the node, not on the server: a
server's run store (``ServerApp(..., store=...)``) never holds it, so it cannot
carry it across a restart. The mod declares :class:`~flowerpets.core.NodeBudget`,
and ``run_simulation``, which rebuilds its nodes when a stored run resumes (so
every node would count its epsilon from 0 again), refuses a stored ServerApp
over a ClientApp with it. A deployment's nodes keep their budget as long as
they keep their contexts; a node process that restarts starts it again.

What it does not protect: the reply's metrics. By default the mod replaces
them with ``num-examples = 1`` and ``dp-local-epsilon``. The weight is 1
because the exact number of examples is a fact about this client's data that
the noise does not cover: with weight 1, FedAvg (and SecAgg+, which needs a
weight metric) weighs clients equally, and the server learns only how many
replied, which it knows anyway. ``dp-local-epsilon`` depends only on the
settings and the rounds this node took part in. ``keep_metrics=True`` keeps
every metric of the handler, unprotected; ``keep_metrics=("train-loss",)``
keeps only those named (for an outer mod that needs them, such as SecAgg+'s
``secure_metrics``; ``num-examples`` named here keeps the exact weight). Both
warn. An outer mod that needs a metric this mod dropped refuses the reply: drop
the metric from the outer mod (the digits demo's SecAgg+ sums no metric under
local DP), or keep it here, knowingly.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from flowerpets._validation import instance, integer, probability, real, strings
from flowerpets.core import (
    WEIGHT_KEY,
    ArrayRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    NodeBudget,
    RecordDict,
)
from flowerpets.core.state import StateSlot
from flowerpets.dp._primitives.calibration import analytic_gaussian_sigma, gaussian_epsilon
from flowerpets.dp._primitives.clip import clip_update, update_between
from flowerpets.dp._primitives.noise import lazy_gaussian_source
from flowerpets.dp.accountant import Neighbouring
from flowerpets.exceptions import ParameterValueError, RequestRefusedError, StateError

__all__ = ["LocalDpMod"]

CallNext = Callable[[Message, Context], Message]
STATE_KEY = "dp.local"


@dataclass(frozen=True, slots=True)
class _Spent:
    """What a node has spent: its rounds and their precision ``sum z^-2`` (epsilon derives)."""

    rounds: int = 0
    precision: float = 0.0

    def __post_init__(self) -> None:
        integer("rounds", self.rounds, at_least=0)
        real("precision", self.precision, at_least=0)


_SLOT = StateSlot(_Spent, STATE_KEY)


def _kept_metrics(value: object) -> bool | tuple[str, ...]:
    if isinstance(value, bool):
        return value
    return strings("keep_metrics", value, unique=True, check=_metric_name)


def _metric_name(name: str) -> None:
    if not name:
        raise ParameterValueError("keep_metrics must not name the empty metric ''")


class LocalDpMod(NodeBudget):
    """Client mod: clip the update to ``clipping_norm`` and add analytic-Gaussian noise.

    Each round is (``epsilon``, ``delta``)-DP for this client's data under
    ``neighbouring``. ``max_epsilon`` caps the composed epsilon (at ``delta``)
    over the node's rounds. ``rng`` replaces the secure noise source with a
    seeded generator, for tests only (it warns).
    """

    def __init__(
        self,
        *,
        clipping_norm: float,
        epsilon: float,
        delta: float,
        neighbouring: Neighbouring = Neighbouring.REPLACE_ONE,
        max_epsilon: float | None = None,
        rng: np.random.Generator | None = None,
        keep_metrics: bool | Iterable[str] = False,
    ) -> None:
        self.clipping_norm = real("clipping_norm", clipping_norm, above=0)
        self.epsilon = real("epsilon", epsilon, above=0)
        self.delta = probability("delta", delta, zero=False, one=False)
        self.neighbouring = instance("neighbouring", neighbouring, Neighbouring)
        if max_epsilon is not None:
            max_epsilon = real("max_epsilon", max_epsilon, above=0)
        self.max_epsilon = max_epsilon
        if self.max_epsilon is not None and self.max_epsilon < self.epsilon:
            raise ParameterValueError(
                f"max_epsilon={self.max_epsilon} is below one round's epsilon={self.epsilon}: "
                "no round could run"
            )
        self.sensitivity = neighbouring.sensitivity_factor * self.clipping_norm
        self.sigma = analytic_gaussian_sigma(self.epsilon, self.delta, sensitivity=self.sensitivity)
        self.keep_metrics: bool | tuple[str, ...] = _kept_metrics(keep_metrics)
        # The secure source (an AES-CTR key) is built on first use and never pickled, so the
        # mod can be sent to a node process without its key; a seeded test source is kept.
        self._noise = lazy_gaussian_source(rng, owner="LocalDpMod")
        if self.keep_metrics:
            named = self.keep_metrics if isinstance(self.keep_metrics, tuple) else None
            which = "" if named is None else f" {list(named)}"
            warnings.warn(
                f"LocalDpMod(keep_metrics=...) sends the handler's metrics{which} without "
                "noise: they are not covered by the local DP guarantee",
                UserWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return (
            f"LocalDpMod(clipping_norm={self.clipping_norm}, epsilon={self.epsilon}, "
            f"delta={self.delta}, neighbouring={self.neighbouring.name}, sigma={self.sigma:.4g})"
        )

    @property
    def noise_multiplier(self) -> float:
        """sigma over the sensitivity: what one round is, as a Gaussian mechanism."""
        return self.sigma / self.sensitivity

    @staticmethod
    def _spent(context: Context) -> _Spent:
        # Corrupt state refuses (the budget is not forgotten); the reason names a field, no value.
        try:
            return _SLOT.get(context.state, _Spent())
        except StateError as exc:
            raise RequestRefusedError(f"the node's {STATE_KEY!r} state is corrupt: {exc}") from None

    def _epsilon(self, precision: float) -> float:
        return 0.0 if precision == 0 else gaussian_epsilon(precision**-0.5, self.delta)

    def spent(self, context: Context) -> float:
        """This node's composed epsilon so far, at ``delta``."""
        return self._epsilon(self._spent(context).precision)

    def __call__(self, msg: Message, context: Context, call_next: CallNext) -> Message:
        if msg.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        spent = self._spent(context)
        precision_after = spent.precision + self.noise_multiplier**-2
        epsilon_after = self._epsilon(precision_after)
        if self.max_epsilon is not None and epsilon_after > self.max_epsilon:
            raise RequestRefusedError(
                f"local DP budget: another round would raise this node's epsilon to "
                f"{epsilon_after:.4g} > max_epsilon={self.max_epsilon:g} (delta={self.delta:g})"
            )
        received = msg.require_content().get_typed("arrays", ArrayRecord)
        reply = call_next(msg, context)
        if reply.error is not None:
            return reply
        body = reply.require_content()
        update = update_between(body.get_typed("arrays", ArrayRecord), received)
        clipped = clip_update(update, self.clipping_norm)
        noised: dict[str, np.ndarray] = {}
        for name, delta in clipped.arrays.items():
            base = received[name].numpy()
            value = self._noise.normal(self.sigma, delta.shape)
            value += delta
            value += base
            noised[name] = value.astype(base.dtype if base.dtype.kind == "f" else np.float64)
        _SLOT.store(
            context.state,
            dataclasses.replace(spent, rounds=spent.rounds + 1, precision=precision_after),
        )
        handler = body.get_typed("metrics", MetricRecord) if "metrics" in body else MetricRecord()
        if self.keep_metrics is True:
            metrics = MetricRecord(handler)
        else:
            metrics = MetricRecord({WEIGHT_KEY: 1})
            for name in self.keep_metrics if isinstance(self.keep_metrics, tuple) else ():
                if name in handler:
                    metrics[name] = handler[name]
        metrics["dp-local-epsilon"] = epsilon_after
        content = RecordDict(body)
        content["arrays"] = ArrayRecord.from_numpy(noised, copy=False)
        content["metrics"] = metrics
        return Message(metadata=reply.metadata, content=content)

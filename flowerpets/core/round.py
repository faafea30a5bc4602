"""What a server mod receives and returns: one round's request and its result."""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from flowerpets.core.context import Context
from flowerpets.core.grid import Grid
from flowerpets.core.message import Error, MessageType
from flowerpets.core.quantized import QuantizedDomain
from flowerpets.core.records import (
    ArrayRecord,
    ConfigRecord,
    ConfigValue,
    MetricRecord,
    RecordDict,
)
from flowerpets.core.sampling import CohortSampling, FullParticipation
from flowerpets.exceptions import (
    InvalidUpdateError,
    NotFoundError,
    ParameterTypeError,
    ParameterValueError,
    QuantizedRoundError,
    UsageError,
)

if TYPE_CHECKING:  # the journal's module imports this one
    from flowerpets.core.journal import RunJournal

__all__ = [
    "SEALED_WEIGHT_KEY",
    "WEIGHT_KEY",
    "Failure",
    "FailureKind",
    "RoundRequest",
    "RoundResult",
    "SealedArrays",
    "SealedSum",
    "SecureAggregator",
    "ServerContext",
    "ServerMod",
    "fewest_inputs_of",
    "is_sealed",
]

# The reply metric that weighs a node's update (Flower's convention).
WEIGHT_KEY = "num-examples"

# Reserved array name: in a sealed global model (see SealedArrays), the total weight
# the nodes divide the opened sum by. No model array may use it.
SEALED_WEIGHT_KEY = "sealed.total-weight"


class FailureKind(enum.StrEnum):
    """The one taxonomy of why a node did not contribute to a stage.

    The ``Error`` on a :class:`Failure` says what happened in the node's or the
    runtime's words; the kind says who is to blame, which the error code alone
    cannot (a node's own ``INVALID_REPLY`` error reply is an ``ERROR_REPLY``).
    """

    ERROR_REPLY = "error-reply"
    """The node answered with an error: it refused, or its app or a mod raised."""
    NO_REPLY = "no-reply"
    """No answer: the wait ran out (``TIMEOUT``) or the runtime knew the node gone."""
    INVALID_REPLY = "invalid-reply"
    """The answer could not be used: missing records, wrong types, names or shapes, NaN."""
    PROTOCOL_VIOLATION = "protocol-violation"
    """A well-formed answer that breaks the protocol: another session, a reused key,
    shares for nodes it was not told of."""
    EXCLUDED = "excluded"
    """Not about its own answer: the server left the node out (too few live neighbours,
    no key), so it could not contribute."""


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a node did not contribute to a round, at which stage, and of which kind."""

    stage: str
    error: Error
    kind: FailureKind

    def __str__(self) -> str:
        return f"{self.stage}: {self.error}"


@dataclass(frozen=True, slots=True)
class RoundRequest:
    """One round, as the strategy configured it, before any node has seen it.

    A server mod may return a changed copy (``request.replace(config=...)``),
    for example to add a clipping norm to the config every node receives.

    ``quantized`` (a :class:`~flowerpets.core.quantized.QuantizedDomain`) says
    that the reply arrays it names are residues modulo ``2**modulus_bits``: the
    secure aggregator sums each of them modulo that, unweighted, and returns
    the sum in ``RoundResult.aggregate[name]`` as ``uint64`` residues (same
    shape as the nodes sent, never divided); the other reply arrays are summed
    as usual. Only a secure aggregator that honours it (SecAgg+) can run such a
    round: every other step refuses it before sending anything
    (:meth:`refuse_quantized`).
    """

    round: int
    cohort: tuple[int, ...]
    arrays: ArrayRecord
    config: ConfigRecord
    sampling: CohortSampling = field(default_factory=FullParticipation)
    population: int = 0
    message_type: str = MessageType.TRAIN
    # Reply metric that weighs each update; None sums the updates unweighted.
    weight_key: str | None = WEIGHT_KEY
    timeout: float | None = None
    quantized: QuantizedDomain | None = None

    def __post_init__(self) -> None:
        if self.quantized is not None and not isinstance(self.quantized, QuantizedDomain):
            raise ParameterTypeError(
                f"quantized must be a QuantizedDomain or None, got {type(self.quantized).__name__}"
            )

    def replace(self, **changes: Any) -> RoundRequest:
        return replace(self, **changes)

    def refuse_quantized(self, step: str) -> None:
        """Raise :class:`~flowerpets.exceptions.QuantizedRoundError` if the round is quantized.

        What every step that cannot sum residues modulo calls before it sends
        anything (``step`` names it in the message).
        """
        if self.quantized is not None:
            raise QuantizedRoundError(
                f"round {self.round}: a quantized round (arrays {list(self.quantized.names)[:4]} "
                f"summed modulo 2**{self.quantized.modulus_bits}) needs SecAgg+ (a secure "
                f"aggregator that sums modulo), but reached {step}, which cannot: put "
                "SecAggPlus() last among the server mods"
            )


@runtime_checkable
class SealedSum(Protocol):
    """A weighted sum the server holds but cannot read (for example, CKKS ciphertexts).

    This is where PETs meet without importing each other: a mod that seals the
    sum (homomorphic encryption) returns a ``RoundResult`` whose ``sealed``
    field implements this, and a mod that post-processes sums (central DP adds
    noise) goes through :meth:`RoundResult.add_to_sum`, which works on a plain
    or a sealed sum alike.
    """

    def add_plaintext(self, arrays: Mapping[str, NDArray[np.float64]]) -> SealedSum:
        """A new sealed sum equal to this one plus ``arrays`` (same names and shapes)."""
        ...


@runtime_checkable
class SealedArrays(SealedSum, Protocol):
    """A sealed sum that can travel to the nodes, which open it (for example, CKKS).

    The server cannot divide a sum it cannot read, so the global model stays
    sealed: :class:`~flowerpets.core.strategy.FedAvg` sends the nodes
    :meth:`to_arrays` plus the total weight under :data:`SEALED_WEIGHT_KEY`, and a
    client mod that holds the key opens the sum and divides it before the
    handler sees plain arrays.
    """

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        """The names and shapes of the model arrays this sum seals, in model order."""
        ...

    def to_arrays(self) -> ArrayRecord:
        """The wire form, under reserved names that no model array uses."""
        ...


def is_sealed(arrays: ArrayRecord) -> bool:
    """True if ``arrays`` is a sealed global model (it carries :data:`SEALED_WEIGHT_KEY`)."""
    return SEALED_WEIGHT_KEY in arrays


@dataclass(frozen=True, slots=True)
class RoundResult:
    """A round's outcome: the weighted *sum* of the updates, and who made it.

    ``aggregate`` is the sum of ``weight_i * update_i`` over the participants
    and ``total_weight`` the sum of their weights, so the mean is
    ``aggregate / total_weight`` (see :meth:`mean`). Keeping the sum lets a mod
    change the denominator (central DP divides by the expected cohort size) or
    keep the aggregate encrypted (HE) without undoing a division.

    When the sum is sealed (``sealed`` is set), ``aggregate`` holds only the
    arrays that were summed in the clear, if any.

    ``fixed_denominator`` is set by a mod whose release must not depend on how
    many nodes replied (central DP: ``total_weight`` is the expected cohort
    size, fixed in advance): the mean is then valid with any number of
    participants, none included, and a strategy must not fail the round for
    having too few (that would reveal how many replied).
    """

    round: int
    aggregate: ArrayRecord
    total_weight: float
    participants: tuple[int, ...]
    failures: Mapping[int, Failure] = field(default_factory=dict)
    metrics: MetricRecord = field(default_factory=MetricRecord)
    sealed: SealedSum | None = None
    fixed_denominator: bool = False

    def replace(self, **changes: Any) -> RoundResult:
        return replace(self, **changes)

    def add_to_sum(self, arrays: Mapping[str, NDArray[np.float64]]) -> RoundResult:
        """This result with ``arrays`` added to the sum, plain or sealed.

        Names in ``aggregate`` are added in the clear; with a sealed sum, the
        other names go to :meth:`SealedSum.add_plaintext`. A name that is in
        neither raises ``KeyError``.
        """
        plain = {n: a for n, a in arrays.items() if n in self.aggregate}
        rest = {n: a for n, a in arrays.items() if n not in self.aggregate}
        if rest and self.sealed is None:
            raise NotFoundError(f"the round's sum has no arrays named {sorted(rest)}")
        aggregate = ArrayRecord(self.aggregate)
        for name, extra in plain.items():
            current = self.aggregate[name].numpy()
            if np.shape(extra) != current.shape:
                raise InvalidUpdateError(
                    f"cannot add shape {np.shape(extra)} to {name!r} of shape {current.shape}"
                )
            aggregate[name] = np.asarray(current, dtype=np.float64) + extra
        sealed = (
            self.sealed.add_plaintext(rest) if rest and self.sealed is not None else self.sealed
        )
        return replace(self, aggregate=aggregate, sealed=sealed)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of every array in the sum, plain ones first, then sealed ones.

        What a mod that adds to the sum (central DP's noise) needs to know,
        whether or not part of the sum is sealed.
        """
        shapes = self.aggregate.layout().shape_map()
        if self.sealed is not None:
            if not isinstance(self.sealed, SealedArrays):
                raise ParameterTypeError(
                    f"the sealed sum ({type(self.sealed).__name__}) does not say which arrays "
                    "it seals: it does not implement SealedArrays"
                )
            shapes.update(self.sealed.shapes)
        return shapes

    def mean(self) -> dict[str, np.ndarray[Any, Any]]:
        """``aggregate / total_weight`` as float64 numpy arrays."""
        if self.total_weight <= 0:
            raise ParameterValueError(
                f"round {self.round}: total weight is {self.total_weight}, no mean"
            )
        return {
            name: np.asarray(a.numpy(), dtype=np.float64) / self.total_weight
            for name, a in self.aggregate.items()
        }


class ServerContext(Context):
    """The server's context: a Context plus the Grid that reaches the nodes.

    A mod that runs its own protocol stages (secure aggregation, key set-up)
    sends them through ``context.grid``. ``secure_aggregation`` is true when one
    of the app's server mods sums updates so the server never sees them one by
    one (it is a :class:`SecureAggregator`); a mod that needs individual
    updates (server-side clipping) must refuse to run then. ``journal`` is the
    run's store when the ServerApp has one (None otherwise): a
    :class:`~flowerpets.core.journal.DurableState` mod writes what must be on
    disk before a release through it. ``fewest_inputs`` is the innermost secure
    aggregator's :meth:`SecureAggregator.fewest_inputs` (None without one): the
    fewest nodes whose inputs a sum it releases holds, for a cohort size (what
    distributed DP sizes each node's noise share for).
    """

    __slots__ = ("fewest_inputs", "grid", "journal", "secure_aggregation")

    def __init__(
        self,
        *,
        grid: Grid | None = None,
        secure_aggregation: bool = False,
        run_id: int = 0,
        run_config: Mapping[str, ConfigValue] | None = None,
        state: RecordDict | None = None,
        journal: RunJournal | None = None,
        fewest_inputs: Callable[[int], int] | None = None,
    ) -> None:
        super().__init__(0, run_id=run_id, run_config=run_config, state=state)
        self.grid = grid
        self.secure_aggregation = secure_aggregation
        self.journal = journal
        self.fewest_inputs = fewest_inputs

    def require_grid(self) -> Grid:
        if self.grid is None:
            raise UsageError("this server context has no grid: run the app through a runtime")
        return self.grid


ServerMod = Callable[
    [RoundRequest, ServerContext, Callable[[RoundRequest, ServerContext], RoundResult]],
    RoundResult,
]


class SecureAggregator(abc.ABC):
    """A server mod that sums the updates so the server never sees one on its own.

    Subclassing it is how a mod declares the capability (SecAgg+, HE): the
    ServerApp then sets ``context.secure_aggregation`` for every mod of the
    app, and a mod that needs the updates one by one (server-side clipping)
    refuses to run beside it.
    """

    __slots__ = ()

    # Read-only view for code that checks the attribute; the class is the declaration.
    secure_aggregation: ClassVar[bool] = True

    @abc.abstractmethod
    def __call__(
        self,
        request: RoundRequest,
        context: ServerContext,
        call_next: Callable[[RoundRequest, ServerContext], RoundResult],
    ) -> RoundResult:
        """Run the round (usually replacing the inner exchange)."""

    def fewest_inputs(self, cohort_size: int) -> int:
        """The fewest nodes whose inputs a sum this aggregator releases holds, for a cohort
        of ``cohort_size``: it fails a round rather than release a sum of fewer.

        A mod that counts on the inputs in the sum relies on it (distributed DP sizes
        each node's noise share so that this many shares suffice). The default, 1,
        promises nothing beyond one input.
        """
        return 1


def fewest_inputs_of(mods: Iterable[object]) -> Callable[[int], int] | None:
    """The innermost :class:`SecureAggregator` among ``mods``' ``fewest_inputs`` (None if none).

    The innermost one (the last listed) is the one that sums: an outer one never sees the
    replies.
    """
    aggregators = [m for m in mods if isinstance(m, SecureAggregator)]
    return aggregators[-1].fewest_inputs if aggregators else None

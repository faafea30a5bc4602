"""What the server sees in one SecAgg+ round, for the demo to show next to what it learns.

:class:`ServerView` is three mods that record the first few values of one
round at three places, and nothing else:

* :meth:`ServerView.inside`, a client mod just inside ``secaggplus_mod``: a
  node's reply as SecAgg+ receives it, before masking (it never leaves the node);
* :meth:`ServerView.outside`, the outermost client mod: the same reply as it
  leaves the node, which is all the server ever receives from it (the masked
  vector, uniform words modulo 2**32);
* :meth:`ServerView.unmasked`, a server mod just outside ``SecAggPlus``: the sum
  the server unmasks, the only thing secure aggregation reveals (under
  distributed DP a sum of noised residues, shown as the integers they stand
  for), and
  :meth:`ServerView.released`, the outermost server mod: the model the round
  releases (after central DP's noise, when it runs).

It is a demonstration: it keeps a handful of numbers of its first round, so
the demo can print one honest line per stage. It is not part of any protocol.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from flowerpets.core import (
    ArrayRecord,
    ClientMod,
    Context,
    Message,
    MessageType,
    RoundRequest,
    RoundResult,
    ServerContext,
)
from flowerpets.secagg.protocol import MASKED_ARRAY, MASKED_RECORD, Stage

__all__ = ["ServerView", "Snapshot"]

FIRST = 4  # values shown per stage

CallNext = Callable[[Message, Context], Message]
ServerCallNext = Callable[[RoundRequest, ServerContext], RoundResult]


def _last(arrays: ArrayRecord) -> tuple[str, int, int]:
    """The last array's name, its size, and where it starts in the flattened model.

    The last array (the output layer's bias in the demo's models) moves from
    the first round on; the first (the weights of pixel 0, which is always
    blank in these images) never does.
    """
    names = list(arrays)
    if not names:
        return "", 0, 0
    start = sum(arrays[n].numpy().size for n in names[:-1])
    return names[-1], arrays[names[-1]].numpy().size, start


def _head(arrays: ArrayRecord) -> NDArray[np.float64]:
    """The first values of the last array, as float64 (residues as the integers they stand for)."""
    name, _, _ = _last(arrays)
    if not name:
        return np.zeros(0)
    values = np.asarray(arrays[name].numpy()).ravel()[:FIRST]
    if values.dtype.kind == "u":  # residues mod 2**32 (distributed DP): centred
        signed = values.astype(np.int64) & 0xFFFFFFFF
        signed[signed >= 1 << 31] -= 1 << 32
        return signed.astype(np.float64)
    return np.asarray(values, dtype=np.float64).copy()


def _is_residues(arrays: ArrayRecord) -> bool:
    name, _, _ = _last(arrays)
    return bool(name) and arrays[name].numpy().dtype.kind == "u"


@dataclass
class Snapshot:
    """The first values of round :attr:`round` at each stage (node ``partition-id`` ``node``)."""

    round: int
    node: int
    array: str  # the array shown
    size: int  # its values
    cohort: int
    reply: NDArray[np.float64]
    masked: NDArray[np.uint32]
    mean: NDArray[np.float64]
    released: NDArray[np.float64] | None
    residues: bool = False  # distributed DP: the replies are noised residues, summed unweighted

    def lines(self, noise_std: float | None = None) -> list[str]:
        """The demo's lines: one per stage, aligned."""

        def floats(values: NDArray[np.float64]) -> str:
            return "[" + " ".join(f"{v:+.4f}" for v in values) + " ...]"

        def integers(values: NDArray[np.float64]) -> str:
            return "[" + " ".join(f"{int(v):+d}" for v in values) + " ...]"

        words = "[" + " ".join(f"{int(v):>10d}" for v in self.masked) + " ...]"
        shown = integers if self.residues else floats
        unmasked = (
            f"the sum of all {self.cohort} replies, their noise shares in it, and only that"
            if self.residues
            else f"the mean of all {self.cohort} replies, and only that"
        )
        rows = [
            (
                f"node {self.node}'s reply before masking",
                shown(self.reply),
                "its noised residues: never leave it" if self.residues else "never leaves it",
            ),
            (f"what node {self.node} sends the server", words, "uniform words mod 2^32"),
            ("what the server unmasks", shown(self.mean), unmasked),
        ]
        if self.released is not None and noise_std is not None:
            rows.append(
                (
                    "the model the round releases",
                    floats(self.released),
                    f"that noised sum decoded, over m (noise std {noise_std:.3g})"
                    if self.residues
                    else f"that mean + central DP noise (std {noise_std:.3g})",
                )
            )
        width = max(len(r[0]) for r in rows)
        value_width = max(len(r[1]) for r in rows)
        head = (
            f"what the server sees in round {self.round} (the first {len(self.reply)} of the "
            f"{self.size} values of {self.array!r}):"
        )
        return [head, *(f"  {a:<{width}}  {b:<{value_width}}  {c}" for a, b, c in rows)]


@dataclass
class ServerView:
    """Records the first round's values at each stage; see the module docstring."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    # (round, partition-id) -> first values
    _replies: dict[tuple[int, int], NDArray[np.float64]] = field(default_factory=dict)
    _masked: dict[tuple[int, int], NDArray[np.uint32]] = field(default_factory=dict)
    _round: int | None = None
    _mean: NDArray[np.float64] | None = None
    _released: NDArray[np.float64] | None = None
    _array: str = ""
    _size: int = 0
    _start: int = 0
    _cohort: int = 0
    _residues: bool = False

    # -- client side ---------------------------------------------------------------------------
    def inside(self, msg: Message, context: Context, call_next: CallNext) -> Message:
        reply = call_next(msg, context)
        content = reply.content if reply.error is None else None
        if self._wanted(msg) and content is not None and "arrays" in content:
            arrays = content.get_typed("arrays", ArrayRecord)
            name, size, start = _last(arrays)
            with self._lock:
                self._replies[msg.metadata.round, self._node(context)] = _head(arrays)
                self._array, self._size, self._start = name, size, start
        return reply

    def outside(self, msg: Message, context: Context, call_next: CallNext) -> Message:
        reply = call_next(msg, context)
        if (
            self._wanted(msg)
            and msg.metadata.stage == Stage.COLLECT_MASKED_INPUT
            and reply.error is None
            and reply.content is not None
            and MASKED_RECORD in reply.content
        ):
            # The vector holds the arrays in order, then the weight and the metrics.
            vector = reply.content.get_typed(MASKED_RECORD, ArrayRecord)[MASKED_ARRAY].numpy()
            with self._lock:
                key = (msg.metadata.round, self._node(context))
                start = self._start
                self._masked[key] = np.array(vector[start : start + FIRST], dtype=np.uint32)
        return reply

    def _wanted(self, msg: Message) -> bool:
        return msg.message_type == MessageType.TRAIN and (
            self._round is None or msg.metadata.round == self._round
        )

    @staticmethod
    def _node(context: Context) -> int:
        pid = context.node_config.get("partition-id", context.node_id)
        return int(pid) if isinstance(pid, int) else context.node_id

    @property
    def client_mods(self) -> tuple[ClientMod, ClientMod]:
        """``(outside, inside)``: chain them around ``secaggplus_mod``."""
        return self.outside, self.inside

    # -- server side ---------------------------------------------------------------------------
    def unmasked(
        self, request: RoundRequest, context: ServerContext, call_next: ServerCallNext
    ) -> RoundResult:
        result = call_next(request, context)
        if self._mean is None and result.participants and _is_residues(result.aggregate):
            # Distributed DP: a sum of residues, never divided (the mod outside decodes it).
            self._round, self._cohort = request.round, len(result.participants)
            self._mean, self._residues = _head(result.aggregate), True
        elif self._mean is None and result.total_weight > 0:
            self._round, self._cohort = request.round, len(result.participants)
            self._mean = _head(result.aggregate) / result.total_weight
        return result

    def released(
        self, request: RoundRequest, context: ServerContext, call_next: ServerCallNext
    ) -> RoundResult:
        result = call_next(request, context)
        if self._released is None and request.round == self._round and result.total_weight > 0:
            self._released = _head(result.aggregate) / result.total_weight
        return result

    # -- what was seen -------------------------------------------------------------------------
    def snapshot(self) -> Snapshot | None:
        """The first round that completed, seen from the lowest node that took part in it."""
        if self._round is None or self._mean is None:
            return None
        with self._lock:
            seen = sorted(set(self._replies) & set(self._masked))
            nodes = [node for rnd, node in seen if rnd == self._round]
            if not nodes:
                return None
            key = (self._round, nodes[0])
            return Snapshot(
                round=self._round,
                node=nodes[0],
                array=self._array,
                size=self._size,
                cohort=self._cohort,
                reply=self._replies[key],
                masked=self._masked[key],
                mean=self._mean,
                released=self._released,
                residues=self._residues,
            )

"""A hand-driven SecAgg+ federation: the caller plays the server, honest or not.

``Federation`` holds a few nodes running the real client mod and a train
handler with known (synthetic) updates, and sends them stage messages built by
hand, keeping what an honest server would keep. Attack demonstrations (and the
tests) use it to send what a dishonest server would.

It is a demonstration bench, not a runtime: every key and mask comes from a
generator seeded by ``seed``, so that an attack replays exactly. Never use it
(or :func:`seeded_randomness`) for a real round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from flowerpets.core import (
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flowerpets.core.fields import Fields
from flowerpets.exceptions import RequestRefusedError
from flowerpets.secagg.client import SecAggPlusClientMod
from flowerpets.secagg.identity import enroll
from flowerpets.secagg.parameters import cohort_quorum
from flowerpets.secagg.protocol import (
    MASKED_ARRAY,
    MASKED_RECORD,
    RECORD,
    RoundConfig,
    Stage,
    Threat,
)

Randomness = Callable[[int], bytes]


def seeded_randomness(seed: int) -> Randomness:
    """A deterministic ``randomness(n)`` for demonstrations and tests (never for real keys)."""
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def ok(reply: Message) -> RecordDict:
    """The content of a reply that must not be an error."""
    if reply.error is not None:
        raise RequestRefusedError(f"unexpected error reply: {reply.error}")
    return reply.require_content()


def fields_of(reply: Message) -> Fields:
    """The protocol fields of a reply that must not be an error, read with their types."""
    return Fields.of(ok(reply), RECORD)


def masked_vector(reply: Message) -> np.ndarray:
    """The masked vector a collect-masked-input reply carries (a copy)."""
    record = ok(reply).get_typed(MASKED_RECORD, ArrayRecord)
    return record[MASKED_ARRAY].numpy().copy()


class Federation:
    """``n`` nodes behind the real client mod, and a server played by the caller.

    ``quorum`` (malicious mode) is the cohort quorum the round configuration asks
    for; by default what ``SecAggPlus`` asks for (:func:`cohort_quorum` at its
    default ``corrupted_fraction``, 0 on the complete graph), with nodes that require
    it, as they do by default. ``quorum=0`` builds nodes with
    ``require_quorum=False`` (which warns): the sparse-graph weakness the regional
    views attack (:mod:`flowerpets.secagg.attacks.regional`).
    """

    def __init__(
        self,
        n: int = 8,
        *,
        degree: int = 4,
        threshold: int = 3,
        params: int = 64,
        seed: int = 0,
        weight_key: str | None = "num-examples",
        max_weight: int = 100,
        clipping_range: float = 8.0,
        secure_metrics: tuple[str, ...] = (),
        threat: str = Threat.SEMI_HONEST,
        quorum: int | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.ids = [int(i) for i in rng.choice(np.arange(100, 10_000), size=n, replace=False)]
        self.updates = rng.uniform(-1, 1, size=(n, params)).astype(np.float32)
        self.weights = [int(w) for w in rng.integers(1, max(max_weight, 2), size=n)]
        self.index = {node: i for i, node in enumerate(self.ids)}
        self.threat = Threat(threat)
        self.malicious = self.threat is Threat.MALICIOUS
        if quorum is None:
            quorum = cohort_quorum(n) if self.malicious and degree < n - 1 else 0
        # The PKI: in malicious mode every node's identity key, enrolled (the honest nodes'
        # keys; a caller playing the server never uses them to sign on a node's behalf).
        self.enrolment = enroll(self.ids, randomness=seeded_randomness(seed + 2))
        self.mod = SecAggPlusClientMod(
            randomness=seeded_randomness(seed + 1),
            threat=self.threat,
            identities=self.enrolment.identities if self.malicious else None,
            identity=self.enrolment.keyring if self.malicious else None,
            require_quorum=quorum > 0 if self.malicious else None,
        )
        self.app = ClientApp(mods=[self.mod])
        self.handler_calls: list[int] = []

        @self.app.train()
        def train(msg: Message, context: Context) -> RecordDict:
            i = self.index[context.node_id]
            self.handler_calls.append(context.node_id)
            return RecordDict(
                {
                    "arrays": ArrayRecord({"w": self.updates[i]}),
                    "metrics": MetricRecord({"num-examples": self.weights[i], "loss": 0.5}),
                }
            )

        self.contexts = {node: Context(node_id=node, run_id=1) for node in self.ids}
        order = [self.ids[i] for i in rng.permutation(n)]
        self.round = 1
        self.config = RoundConfig(
            session=rng.bytes(16),
            order=tuple(order),
            degree=degree,
            threshold=threshold,
            clipping_range=clipping_range,
            max_weight=max_weight,
            weight_key=weight_key,
            secure_metrics=secure_metrics,
            threat=self.threat,
            quorum=quorum,
        )
        self.graph = self.config.graph
        self.pks: dict[int, tuple[bytes, bytes]] = {}
        self.key_signatures: dict[int, bytes] = {}  # malicious mode: each advertisement's
        self.set_signatures: dict[int, bytes] = {}  # ... and each node's of its survivor set
        self.ciphertexts: dict[int, dict[int, bytes]] = {}  # receiver -> sender -> ciphertext
        self.masked: dict[int, np.ndarray] = {}

    # -- sending ---------------------------------------------------------------------
    def ask(
        self,
        node: int,
        stage: str,
        fields: Mapping[str, Any],
        *,
        round: int | None = None,
        session: bytes | None = None,
        extra: Mapping[str, Any] | None = None,
        message_type: str = MessageType.TRAIN,
    ) -> Message:
        """Send ``node`` one stage message with these protocol fields; its reply."""
        record = ConfigRecord({"session": self.config.session if session is None else session})
        for key, value in fields.items():
            record[key] = value
        content = RecordDict({RECORD: record, **(extra or {})})
        msg = Message.create(
            content,
            message_type=message_type,
            dst_node_id=node,
            round=self.round if round is None else round,
            run_id=1,
            stage=stage,
        )
        return self.app(msg, self.contexts[node])

    # -- an honest server's stages -------------------------------------------------
    def advertise_message_fields(self) -> dict[str, Any]:
        record = self.config.to_record()
        return {k: v for k, v in record.items() if k != "session"}

    def neighbours(self, node: int, among: set[int] | None = None) -> list[int]:
        alive = set(self.pks) if among is None else among
        return [j for j in self.graph.neighbours(node) if j in alive]

    def share_fields(self, node: int) -> dict[str, Any]:
        nbrs = self.neighbours(node)
        fields: dict[str, Any] = {
            "nodes": nbrs,
            "c-pks": [self.pks[j][0] for j in nbrs],
            "s-pks": [self.pks[j][1] for j in nbrs],
        }
        if self.malicious:
            fields["signatures"] = [self.key_signatures[j] for j in nbrs]
        return fields

    def share(self, nodes: list[int] | None = None) -> None:
        for node in nodes or list(self.pks):
            body = fields_of(self.ask(node, Stage.SHARE_KEYS, self.share_fields(node)))
            receivers, ciphertexts = body.items("receivers", int), body.items("ciphertexts", bytes)
            for receiver, ct in zip(receivers, ciphertexts, strict=True):
                self.ciphertexts.setdefault(receiver, {})[node] = ct

    def collect_fields(self, node: int, senders: list[int] | None = None) -> dict[str, Any]:
        got = self.ciphertexts.get(node, {})
        senders = (
            [j for j in self.graph.neighbours(node) if j in got] if senders is None else senders
        )
        return {"senders": senders, "ciphertexts": [got[j] for j in senders]}

    def train_content(self) -> dict[str, Any]:
        return {
            "arrays": ArrayRecord({"w": np.zeros(self.updates.shape[1], np.float32)}),
            "config": ConfigRecord({"server-round": self.round}),
        }

    def collect(self, nodes: list[int] | None = None) -> None:
        for node in nodes or list(self.ciphertexts):
            reply = self.ask(
                node,
                Stage.COLLECT_MASKED_INPUT,
                self.collect_fields(node),
                extra=self.train_content(),
            )
            self.masked[node] = masked_vector(reply)

    def check(self, nodes: list[int] | None = None, survivors: list[int] | None = None) -> None:
        """Malicious mode's consistency check: each node signs ``survivors`` (default: every
        node that sent a masked input)."""
        listed = list(self.masked) if survivors is None else survivors
        for node in nodes or list(self.masked):
            body = fields_of(self.ask(node, Stage.CONSISTENCY_CHECK, {"survivors": listed}))
            self.set_signatures[node] = body.get("signature", bytes)

    def signed_fields(self, node: int) -> dict[str, Any]:
        """The neighbours' signatures an honest server forwards with the unmask request."""
        if not self.malicious:
            return {}
        signers = [j for j in self.signer_pool(node) if j in self.set_signatures]
        return {"signers": signers, "signatures": [self.set_signatures[j] for j in signers]}

    def signer_pool(self, node: int) -> list[int]:
        """Whose survivor-set signatures ``node`` counts: its neighbours, or with a quorum
        every other node of the cohort (its neighbours first)."""
        nbrs = list(self.graph.neighbours(node))
        if not self.config.quorum:
            return nbrs
        return nbrs + [j for j in self.config.order if j != node and j not in nbrs]

    def unmask(
        self,
        node: int,
        survivors: list[int],
        dropped: list[int],
        signed: Mapping[str, Any] | None = None,
    ) -> Message:
        fields: dict[str, Any] = {"survivors": survivors, "dropped": dropped}
        fields.update(self.signed_fields(node) if signed is None else signed)
        return self.ask(node, Stage.UNMASK, fields)

    def advertise(self, nodes: list[int] | None = None) -> None:
        for node in nodes or self.ids:
            body = fields_of(self.ask(node, Stage.ADVERTISE_KEYS, self.advertise_message_fields()))
            self.pks[node] = (body.get("c-pk", bytes), body.get("s-pk", bytes))
            if self.malicious:
                self.key_signatures[node] = body.get("signature", bytes)

    def honest_until_collect(self) -> None:
        self.advertise()
        self.share()
        self.collect()

    def honest_until_unmask(self) -> None:
        """Every stage before unmasking, as an honest server runs them."""
        self.honest_until_collect()
        if self.malicious:
            self.check()

    ok = staticmethod(ok)

    def next_round(self, seed: int = 99) -> None:
        """Start the next round with a fresh session (same graph)."""
        rng = np.random.default_rng(seed)
        self.round += 1
        self.config = RoundConfig(
            session=rng.bytes(16),
            order=self.config.order,
            degree=self.config.degree,
            threshold=self.config.threshold,
            clipping_range=self.config.clipping_range,
            max_weight=self.config.max_weight,
            weight_key=self.config.weight_key,
            secure_metrics=self.config.secure_metrics,
            threat=self.config.threat,
            quorum=self.config.quorum,
        )
        self.pks, self.ciphertexts, self.masked = {}, {}, {}
        self.key_signatures, self.set_signatures = {}, {}

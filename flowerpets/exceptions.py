"""Every exception flowerpets raises on purpose, in one flat module.

Each class subclasses the built-in that fits, so ``except ValueError`` keeps
working for callers who do not know flowerpets, and ``except FlowerpetsError``
catches everything of ours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the core imports this module; this module needs the core's types only
    from flowerpets.core.round import Failure

__all__ = [
    "AppLoadError",
    "AuthenticationError",
    "CiphertextError",
    "CodecError",
    "ConditionalRoundingError",
    "ConfigurationError",
    "CorruptMessageError",
    "CorruptStateError",
    "CorruptStoreError",
    "DecryptionError",
    "DeploymentError",
    "FlowerpetsError",
    "FrameError",
    "IncompatibleModsError",
    "IncompatibleStrategyError",
    "InconsistentViewError",
    "InfeasibleParametersError",
    "InsecureRandomnessWarning",
    "InvalidUpdateError",
    "KeyHoldersGoneError",
    "KeyMaterialError",
    "KeySetupError",
    "MessageFieldError",
    "MessageTooLargeError",
    "MissingDependencyError",
    "MissingKeyError",
    "MissingPrivacyLedgerError",
    "MissingRunError",
    "MissingStateError",
    "ModelMismatchError",
    "NotEnrolledError",
    "NotFoundError",
    "ParameterTypeError",
    "ParameterValueError",
    "PathExistsError",
    "PrivacyAccountingError",
    "PrivacyLedgerError",
    "PrivacyLedgerMismatchError",
    "ProtocolViolationError",
    "QuantizedRoundError",
    "RecordTypeError",
    "ReplayError",
    "RequestRefusedError",
    "RoundFailedError",
    "RoundSequenceError",
    "RunConfigMismatchError",
    "RunExistsError",
    "SignatureError",
    "StateError",
    "StateTypeError",
    "StopRunError",
    "StoreError",
    "StoreLockedError",
    "StoreWriteError",
    "StoredKeyStateError",
    "TransportError",
    "TruncatedMessageError",
    "TruncatedPrivacyLedgerError",
    "UnknownArrayError",
    "UnsupportedVersionError",
    "UsageError",
]


class FlowerpetsError(Exception):
    """Base class of every error that flowerpets raises on purpose."""


class RecordTypeError(FlowerpetsError, TypeError):
    """A record was given a key or value of a type it does not hold."""


class RequestRefusedError(FlowerpetsError, RuntimeError):
    """A node refused a request on purpose, for example because a protocol check failed.

    A client mod raises it to say no; the node's reply then carries an error with
    code ``REFUSED`` and this exception's message as the reason.
    """


class UsageError(FlowerpetsError, RuntimeError):
    """An object used out of order: a server started twice, a server context with no grid."""


class NotFoundError(FlowerpetsError, KeyError):
    """A lookup found nothing under that name or number.

    No such round in a history, record in a message, array in a round's sum,
    or node in a simulation; the message says what there is instead.
    """


class PathExistsError(FlowerpetsError, FileExistsError):
    """A file or folder flowerpets would write exists, and overwriting it was not asked for."""


class AppLoadError(FlowerpetsError, ImportError):
    """A ``MODULE:ATTRIBUTE`` spec names nothing that loads.

    The module does not import, or it has no such attribute (as Python's own
    ``from module import name`` says with an ImportError).
    """


class ParameterTypeError(FlowerpetsError, TypeError):
    """An argument given to flowerpets is of the wrong type (a str or a bool for an int)."""


class ParameterValueError(FlowerpetsError, ValueError):
    """An argument given to flowerpets has the right type but a value it cannot take."""


class MessageFieldError(FlowerpetsError, ValueError):
    """A message from a peer lacks a field its stage needs, or holds one of the wrong type.

    A node refuses such a request, and a server marks such a reply as malformed:
    it is the peer's fault, not a bug in this process. The reason names the
    field, never its value.
    """


class ConfigurationError(FlowerpetsError):
    """The server's own configuration cannot work, found when a round runs.

    Mods that do not compose, parameters no protocol can meet, privacy the
    accountant cannot account for, names the model may not use: every round
    would fail alike, so the ServerApp ends the run with it instead of
    recording a failed round each time. Each subclass also subclasses the
    built-in that fits.
    """


class DecryptionError(FlowerpetsError, ValueError):
    """A ciphertext failed authentication.

    It was tampered with, replayed, rerouted, or encrypted under another key.
    """


class InfeasibleParametersError(ConfigurationError, ValueError):
    """Protocol parameters that cannot work for this input.

    For example: no secure-aggregation degree and threshold meet the requested
    failure and leakage bounds for the cohort, or a quantized sum could wrap
    around its modulus.
    """


class InvalidUpdateError(FlowerpetsError, ValueError):
    """A client's update cannot be aggregated: wrong names, shapes or dtypes, or NaN/inf."""


class ConditionalRoundingError(FlowerpetsError, RuntimeError):
    """Distributed DP's conditional randomized rounding exceeded its norm bound every try.

    Each try fails with probability at most ``beta``, so this means a chance
    below ``2**-40`` or a broken source of randomness; the message carries no value.
    """


class RoundFailedError(FlowerpetsError, RuntimeError):
    """A round could not complete, for example because too few nodes replied.

    ``failures`` keeps why each node did not contribute (node id -> ``Failure``,
    its stage and error) and ``participants`` the nodes that did what was asked
    until the round failed (none of their updates reached the model): the
    ServerApp records both on the round's record, so a failed round keeps every
    node's reason.
    """

    def __init__(
        self,
        message: str = "",
        *,
        failures: Mapping[int, Failure] | None = None,
        participants: Iterable[int] = (),
    ) -> None:
        super().__init__(message)
        self.failures: dict[int, Failure] = dict(failures or {})
        self.participants: tuple[int, ...] = tuple(participants)


class ProtocolViolationError(FlowerpetsError, ValueError):
    """A well-formed reply that breaks the protocol of its stage.

    For example, a reply for another session, a public key another node already
    advertised, or shares addressed to nodes it was not told of. A stage
    exchange's accept function raises it to record the node's failure as a
    ``PROTOCOL_VIOLATION`` rather than a malformed reply.
    """


class SignatureError(ProtocolViolationError):
    """A signature that is missing, malformed, or does not verify for what it should sign.

    SecAgg+'s malicious mode: a key advertisement or a consistency signature
    that its node's enrolled identity key did not make over this very session,
    round and content (unsigned, forged, or replayed from another round).
    """


class NotEnrolledError(ProtocolViolationError):
    """A node id that the configured identities (the PKI) do not list: a Sybil."""


class InconsistentViewError(ProtocolViolationError):
    """The server showed nodes different views of a round (SecAgg+'s consistency check).

    A survivor set that differs from the one this node signed, or fewer than
    ``t`` of its neighbours' signatures over the same set.
    """


class CiphertextError(InvalidUpdateError):
    """A homomorphic ciphertext that cannot be summed.

    Garbage bytes, other parameters or another key, the wrong size or scale: the
    node that sent it is marked failed for the round, and the sum is unchanged.
    """


class KeySetupError(RoundFailedError):
    """A key set-up stage could not give the round's nodes a key.

    For example, every candidate key generator dropped out. The round fails and
    leaves the model unchanged; the next round tries again.
    """


class KeyMaterialError(FlowerpetsError, ValueError):
    """Key material that cannot be used: a serialized CKKS context, a public key.

    Bytes that do not parse, of other parameters than agreed, a context that holds a
    secret where none may be, or a public key of the wrong size or order. The
    reason names what was wrong, never the bytes.
    """


class UnknownArrayError(FlowerpetsError, KeyError):
    """A name that no array of a layout or a sum has (adding to an array that is not there)."""


class MissingDependencyError(FlowerpetsError, ImportError):
    """A feature needs an optional package that is not installed; the message names the extra."""


class MissingKeyError(FlowerpetsError, LookupError):
    """A node holds no key for this data, for example no CKKS secret key to open a sealed model."""


class IncompatibleModsError(ConfigurationError, RuntimeError):
    """Two mods that cannot work together in one app.

    For example, server-side clipping needs every update one by one, which a
    secure-aggregation mod exists to prevent.
    """


class QuantizedRoundError(IncompatibleModsError, UsageError):
    """A round whose replies hold residues (a quantized domain) reached a step that cannot
    sum modulo: the plain exchange or HE. Only a secure aggregator that honours the domain
    (SecAgg+) can run it; found before anything is sent, and every round would fail alike.
    """


class IncompatibleStrategyError(ConfigurationError, TypeError):
    """A Flower strategy that cannot run over our server mods.

    Its aggregate is not a weighted mean of the replies (a median, Krum, a
    trimmed mean, per-reply clipping), so it needs the updates one by one,
    which secure aggregation exists to hide; or it needs what our mods do not
    produce (a readable sum, one shared request). The message names what to
    use instead.
    """


class PrivacyAccountingError(ConfigurationError, ValueError):
    """A privacy accountant cannot account for an event.

    For example, an RDP accountant asked for a fixed-size cohort under the
    add/remove relation, or a sampling scheme whose amplification is unknown.
    """


class PrivacyLedgerError(PrivacyAccountingError):
    """A run's stored privacy ledger cannot be continued: it is never taken for epsilon 0.

    Raised when a run resumes from a store. The subclasses say why; the reason
    names the run, the population and the field, never a stored value.
    """


class MissingPrivacyLedgerError(PrivacyLedgerError, LookupError):
    """A run with committed rounds has no stored privacy state to continue from."""


class TruncatedPrivacyLedgerError(PrivacyLedgerError):
    """A run's stored privacy state counts fewer events than it spent, or the reverse."""


class PrivacyLedgerMismatchError(PrivacyLedgerError):
    """A run's stored privacy state does not match the mod resuming it.

    Another noise multiplier, clip, delta, budget or accountant, another
    population, or events that are not the ones the population's ledger holds.
    """


class ModelMismatchError(ConfigurationError, ValueError):
    """The global model does not fit a mod's settings.

    It uses a name the mod keeps for its own wire format, or an encryption
    pattern matches none of its arrays.
    """


class StoredKeyStateError(ConfigurationError, ValueError):
    """A run's stored HE key state cannot be continued by the mod resuming it.

    Raised when a run resumes from a store: the state is missing although rounds
    were committed, cannot be read, holds a context that is not the public
    parameters alone, or was kept under other parameters or another selection
    of encrypted arrays. The reason names the run's record and field, never a
    stored value.
    """


class KeyHoldersGoneError(StoredKeyStateError, LookupError):
    """None of the nodes that held a resumed run's CKKS key holds it any more.

    The model is sealed under that key, and only those nodes could open it: a
    new key cannot, so the run ends instead of going on from another model. The
    store keeps its last round; a resume once the nodes are back can continue.
    The reason names the key id and the ids the nodes answered with (public:
    every round's request carries its key id), never key material.
    """


class InsecureRandomnessWarning(FlowerpetsError, UserWarning):
    """Randomness that protects privacy comes from a source that is not cryptographically secure.

    Issued when a caller passes its own seeded generator (for tests and
    reproducible experiments) instead of the default secure source.
    """


class StopRunError(FlowerpetsError, RuntimeError):
    """A server mod ends the run on purpose (for example, the privacy budget is spent).

    The ServerApp stops before the round that raised it changes the model and
    returns what the run produced so far, with this error's message as the reason.
    """


class StateError(FlowerpetsError, ValueError):
    """A context's state record cannot be read back as the state it should hold.

    A state that cannot be read is never taken for a fresh one (a privacy ledger
    must not restart, a protocol round must not begin again): the subclasses say
    why, naming the field, never its value.
    """


class MissingStateError(StateError, LookupError):
    """The context holds no record of this state at all."""


class CorruptStateError(StateError):
    """A malformed state record: a field missing or unknown, another version, a bad value."""


class StateTypeError(StateError, TypeError):
    """A state record, or one of its fields, holds a value of the wrong type."""


class CodecError(FlowerpetsError, ValueError):
    """Bytes that do not decode to a message. The subclasses say why."""


class TruncatedMessageError(CodecError):
    """The input ended before the message did."""


class MessageTooLargeError(CodecError):
    """The message, or one of its parts, is larger than the configured bound."""


class CorruptMessageError(CodecError):
    """The bytes are of the right length but do not form a valid message."""


class UnsupportedVersionError(CodecError):
    """The message was written in a wire-format version this build cannot read."""


class FrameError(CodecError):
    """A transport frame that breaks the framing rules.

    For example an unknown frame kind, chunks out of order, more bytes than the
    message announced, or a digest that does not match the reassembled bytes.
    The connection that sent it is closed.
    """


class DeploymentError(FlowerpetsError, RuntimeError):
    """A local Flower deployment (SuperLink, SuperNodes) failed to start, run or stop in time."""


class TransportError(FlowerpetsError, ConnectionError):
    """A connection between the server and a node failed or was refused."""


class AuthenticationError(TransportError):
    """A node could not prove who it is.

    An unknown public key, a bad signature, or a timestamp too far from the
    server's clock: the server refuses the connection.
    """


class ReplayError(AuthenticationError):
    """A signed request that was seen before (same nonce or sequence number) was sent again."""


class StoreError(FlowerpetsError, RuntimeError):
    """The run store cannot do what was asked. The subclasses say why.

    A store that cannot be read is never taken for an empty one: a run whose
    rounds or privacy ledger cannot be read back is refused, never restarted.
    """


class CorruptStoreError(StoreError):
    """The store file failed an integrity check.

    SQLite's own check on open, a row whose SHA-256 does not match its bytes,
    a file that is not a store or was truncated: the reason names the table and
    row, never the stored values.
    """


class StoreLockedError(StoreError):
    """Another live server holds this run's lease, so a second one may not write to it."""


class StoreWriteError(StoreError):
    """A commit failed (disk full, an I/O error): nothing of it was stored.

    The previous committed round is intact; the caller may retry or stop.
    """


class MissingRunError(StoreError, LookupError):
    """The store holds no run with this id."""


class RunConfigMismatchError(StoreError, ValueError):
    """A run was reopened with a configuration whose digest differs from the stored one."""


class RunExistsError(StoreError, ValueError):
    """A new run was started under an id the store already holds (resume it instead)."""


class RoundSequenceError(StoreError, ValueError):
    """A round committed out of order: each commit must be the round after the last one."""

"""The round-based aggregation core: records, messages, apps, strategies, mod chains.

It knows nothing of cryptography, differential privacy or transports; the PETs
and the runtimes build on it.
"""

from flowerpets.core.aggregation import MetricMean, WeightedSum
from flowerpets.core.client_app import ClientApp, ClientMod, Handler
from flowerpets.core.context import Context
from flowerpets.core.exchange import (
    INVALID_REPLY_ERRORS,
    Accept,
    StageExchange,
    aggregate_round,
    collect,
    reply_weight,
    request_messages,
)
from flowerpets.core.grid import Grid, WaitsForNodes
from flowerpets.core.history import History, RoundRecord
from flowerpets.core.journal import DurableState, NodeBudget, Resumption, RunJournal
from flowerpets.core.layout import ArrayLayout
from flowerpets.core.message import Error, ErrorCode, Message, MessageType, Metadata
from flowerpets.core.mods import chain
from flowerpets.core.quantized import (
    BINDING_KEY,
    MODULUS_BITS_KEY,
    NAMES_KEY,
    QuantizedDomain,
    domain_of,
    modulus_bits_of,
)
from flowerpets.core.records import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigValue,
    MetricRecord,
    MetricValue,
    RecordDict,
)
from flowerpets.core.round import (
    SEALED_WEIGHT_KEY,
    WEIGHT_KEY,
    Failure,
    FailureKind,
    RoundRequest,
    RoundResult,
    SealedArrays,
    SealedSum,
    SecureAggregator,
    ServerContext,
    ServerMod,
    fewest_inputs_of,
    is_sealed,
)
from flowerpets.core.sampling import (
    CohortSampling,
    FixedSizeSampling,
    FullParticipation,
    PoissonSampling,
)
from flowerpets.core.server_app import RunResult, ServerApp
from flowerpets.core.strategy import EvaluateFn, FedAvg, Strategy

__all__ = [
    "Accept",
    "Array",
    "ArrayLayout",
    "ArrayRecord",
    "BINDING_KEY",
    "ClientApp",
    "ClientMod",
    "CohortSampling",
    "ConfigRecord",
    "ConfigValue",
    "Context",
    "DurableState",
    "Error",
    "ErrorCode",
    "EvaluateFn",
    "Failure",
    "FailureKind",
    "FedAvg",
    "FixedSizeSampling",
    "FullParticipation",
    "Grid",
    "Handler",
    "History",
    "INVALID_REPLY_ERRORS",
    "MODULUS_BITS_KEY",
    "Message",
    "MessageType",
    "Metadata",
    "MetricMean",
    "MetricRecord",
    "MetricValue",
    "NAMES_KEY",
    "NodeBudget",
    "PoissonSampling",
    "QuantizedDomain",
    "RecordDict",
    "Resumption",
    "RoundRecord",
    "RoundRequest",
    "RoundResult",
    "RunJournal",
    "RunResult",
    "SEALED_WEIGHT_KEY",
    "SealedArrays",
    "SealedSum",
    "SecureAggregator",
    "ServerApp",
    "ServerContext",
    "ServerMod",
    "StageExchange",
    "Strategy",
    "WEIGHT_KEY",
    "WaitsForNodes",
    "WeightedSum",
    "aggregate_round",
    "chain",
    "collect",
    "domain_of",
    "fewest_inputs_of",
    "is_sealed",
    "modulus_bits_of",
    "reply_weight",
    "request_messages",
]

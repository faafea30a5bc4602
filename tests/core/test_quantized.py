"""The quantized domain in core: its checks, its config keys, and who refuses a quantized round.

A round whose replies hold residues summed modulo ``2**bits`` can only run under a
secure aggregator that honours it (SecAgg+, ``tests/secagg/test_modular.py``): the
plain exchange and HE refuse it before a single message is sent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from flowerpets.core import (
    MODULUS_BITS_KEY,
    NAMES_KEY,
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    FedAvg,
    Message,
    MetricRecord,
    QuantizedDomain,
    RecordDict,
    RoundRequest,
    RoundResult,
    ServerApp,
    ServerContext,
    aggregate_round,
    domain_of,
    modulus_bits_of,
)
from flowerpets.exceptions import (
    ConfigurationError,
    IncompatibleModsError,
    InvalidUpdateError,
    ParameterTypeError,
    ParameterValueError,
    QuantizedRoundError,
    UsageError,
)

DOMAIN = QuantizedDomain(modulus_bits=16, names=("r",))


def test_a_domain_is_its_modulus_and_names() -> None:
    domain = QuantizedDomain(modulus_bits=8, names=["a", "b"])  # type: ignore[arg-type]
    assert domain.names == ("a", "b") and domain.modulus == 256
    assert "a" in domain and "c" not in domain
    assert QuantizedDomain(2, ("x",)).modulus == 4
    assert QuantizedDomain(32, ("x",)).modulus == 2**32
    assert domain == QuantizedDomain(8, ("a", "b")) and hash(domain) == hash(
        QuantizedDomain(8, ("a", "b"))
    )
    with pytest.raises(AttributeError):
        domain.modulus_bits = 9  # type: ignore[misc]  # frozen
    assert not hasattr(domain, "__dict__")  # slotted


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"modulus_bits": 1, "names": ("r",)}, ParameterValueError, "modulus_bits"),
        ({"modulus_bits": 33, "names": ("r",)}, ParameterValueError, "modulus_bits"),
        ({"modulus_bits": 8.0, "names": ("r",)}, ParameterTypeError, "modulus_bits"),
        ({"modulus_bits": True, "names": ("r",)}, ParameterTypeError, "modulus_bits"),
        ({"modulus_bits": 8, "names": ()}, ParameterValueError, "names must not be empty"),
        ({"modulus_bits": 8, "names": ("r", "r")}, ParameterValueError, "repeat"),
        ({"modulus_bits": 8, "names": ("",)}, ParameterValueError, "non-empty"),
        ({"modulus_bits": 8, "names": "r"}, ParameterTypeError, "not one str"),
        ({"modulus_bits": 8, "names": (1,)}, ParameterTypeError, "str"),
    ],
)
def test_a_domain_refuses_what_cannot_be_one(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        QuantizedDomain(**kwargs)


def test_residues_are_unsigned_integers_below_the_modulus_and_a_refusal_shows_none() -> None:
    domain = QuantizedDomain(20, ("r",))
    ok = np.array([0, 1, (1 << 20) - 1], dtype=np.uint64)
    assert domain.check_residues("r", ok) is ok
    assert domain.check_residues("r", np.zeros(0, np.uint8)).size == 0
    secret = 987_654
    for bad, match in [
        (np.array([1, (1 << 20) + secret], np.uint64), r"outside \[0, 2\*\*20\)"),
        (np.array([secret + 0.5]), "unsigned integers"),
        (np.array([-secret]), "unsigned integers"),
        (np.array([True]), "unsigned integers"),
    ]:
        with pytest.raises(InvalidUpdateError, match=match) as caught:
            domain.check_residues("r", bad)
        assert "987" not in str(caught.value) and "'r'" in str(caught.value)


def test_the_config_keys_say_the_modulus_and_the_names() -> None:
    assert MODULUS_BITS_KEY == "quantized.modulus-bits" and NAMES_KEY == "quantized.names"
    config = ConfigRecord({"lr": 0.1, **DOMAIN.config_entries()})
    assert modulus_bits_of(config) == 16
    assert domain_of(config) == DOMAIN
    assert modulus_bits_of(ConfigRecord({"lr": 0.1})) is None
    assert domain_of(ConfigRecord({"lr": 0.1})) is None
    assert modulus_bits_of({MODULUS_BITS_KEY: 32}) == 32
    cases: list[tuple[object, type[Exception]]] = [
        (1, ParameterValueError),
        (64, ParameterValueError),
        ("16", ParameterTypeError),
    ]
    for value, error in cases:
        with pytest.raises(error, match=r"quantized\.modulus-bits"):
            modulus_bits_of({MODULUS_BITS_KEY: value})
    with pytest.raises(ParameterTypeError, match=r"quantized\.names"):
        domain_of({MODULUS_BITS_KEY: 16})


def test_a_request_carries_a_domain_or_none() -> None:
    request = RoundRequest(round=1, cohort=(1, 2), arrays=ArrayRecord(), config=ConfigRecord())
    assert request.quantized is None
    assert request.replace(quantized=DOMAIN).quantized == DOMAIN
    with pytest.raises(ParameterTypeError, match="QuantizedDomain"):
        request.replace(quantized=(16, ("r",)))


def test_the_refusal_is_a_usage_and_an_incompatible_mods_error() -> None:
    assert issubclass(QuantizedRoundError, UsageError)
    assert issubclass(QuantizedRoundError, IncompatibleModsError)
    assert issubclass(QuantizedRoundError, ConfigurationError)  # the run ends with it


# -- who refuses ---------------------------------------------------------------------------------
def _app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> RecordDict:
        arrays = ArrayRecord({"r": np.ones(3, np.uint64), "w": np.ones(3, np.float32)})
        return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})

    return app


def test_the_plain_exchange_refuses_a_quantized_round_before_sending(scripted_grid: Any) -> None:
    grid = scripted_grid(_app(), 3)
    request = RoundRequest(
        round=1, cohort=(1, 2, 3), arrays=ArrayRecord(), config=ConfigRecord(), quantized=DOMAIN
    )
    with pytest.raises(QuantizedRoundError, match="needs SecAgg"):
        aggregate_round(request, ServerContext(grid=grid))
    assert grid.sent == []
    # The control: without the domain the same round runs (and sums "r" weighted, not modulo).
    result = aggregate_round(request.replace(quantized=None), ServerContext(grid=grid))
    assert len(result.participants) == 3 and len(grid.sent) == 3


class Quantize:
    """A server mod that asks for a quantized round (as distributed DP's does)."""

    def __call__(
        self, request: RoundRequest, context: ServerContext, call_next: Any
    ) -> RoundResult:
        return call_next(request.replace(quantized=DOMAIN), context)  # type: ignore[no-any-return]


def test_a_server_app_without_secagg_ends_the_run_before_any_node_hears(scripted_grid: Any) -> None:
    grid = scripted_grid(_app(), 3)
    server = ServerApp(
        strategy=FedAvg(),
        num_rounds=3,
        initial_arrays=ArrayRecord({"w": np.zeros(3, np.float32)}),
        mods=[Quantize()],
    )
    with pytest.raises(QuantizedRoundError, match="aggregate_round"):
        server.run(grid)
    assert grid.sent == []  # every round would fail alike: the run ends at the first


def test_homomorphic_aggregation_refuses_a_quantized_round_before_sending(
    scripted_grid: Any,
) -> None:
    pytest.importorskip("tenseal")
    from flowerpets.he import HomomorphicAggregation

    grid = scripted_grid(_app(), 3)
    request = RoundRequest(
        round=1,
        cohort=(1, 2, 3),
        arrays=ArrayRecord({"w": np.zeros(3, np.float32)}),
        config=ConfigRecord(),
        quantized=DOMAIN,
    )

    def never(request: RoundRequest, context: ServerContext) -> RoundResult:
        raise AssertionError("HE replaces the exchange")

    with pytest.raises(QuantizedRoundError, match="HomomorphicAggregation"):
        HomomorphicAggregation()(request, ServerContext(grid=grid), never)
    assert grid.sent == []

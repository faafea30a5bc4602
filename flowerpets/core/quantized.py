"""The quantized domain: where a PET that adds noise meets one that sums integers modulo.

Distributed DP adds discrete noise to each node's update, turned into integers
modulo ``2**bits``, *before* the update is masked, so the server only ever
unmasks a noised sum; SecAgg+ sums those integers modulo the same modulus. The
two PETs never import each other: they meet here.

* Server side, a mod sets :attr:`RoundRequest.quantized
  <flowerpets.core.RoundRequest.quantized>` to a :class:`QuantizedDomain`: the
  reply arrays it names are *residues*, and the secure aggregator below it sums
  each of them modulo :attr:`QuantizedDomain.modulus`, unweighted, and returns
  the sum as ``uint64`` residues in ``[0, modulus)`` in
  ``RoundResult.aggregate[name]`` (same shape as the nodes sent, no division;
  the mod that asked rescales). A round with a domain and no secure aggregator
  that honours it fails before anything is sent
  (:class:`~flowerpets.exceptions.QuantizedRoundError`): the plain exchange and
  HE cannot sum modulo.
* Node side, the secure aggregator's client mod tells the mods and handler
  inside it that their reply will be masked modulo ``2**bits``: it sets
  :data:`MODULUS_BITS_KEY` (and :data:`NAMES_KEY`) in the config of the train
  message it passes inward, and removes any value of them the server sent
  itself. An inner mod that adds noise reads them with :func:`modulus_bits_of`
  (or :func:`domain_of`) and refuses when they are absent: no secure
  aggregation outside it, so its reply would leave in the clear. (That only
  holds when the node runs the secure aggregator's client mod outside it: without
  one, nothing removes a value the server forged.)
* :attr:`QuantizedDomain.binding` is opaque to the secure aggregator: a digest
  of whatever the noising mod sent the nodes for this round (its encoding, in
  its own config key). The secure aggregator carries it in its round
  configuration and the digest of it (in SecAgg+'s malicious mode, every node
  that exchanges keys agrees on that digest, or refuses the others' keys) and
  passes it inward under :data:`BINDING_KEY`; the inner mod recomputes the
  digest of what it received and refuses a mismatch, so a server cannot tell
  two nodes different encodings unnoticed.

The scale (how many steps per unit of the update) is the noising mechanism's
own business: it travels with its mod, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from flowerpets._validation import instance, integer, strings
from flowerpets.core.records import ConfigValue
from flowerpets.exceptions import InvalidUpdateError, ParameterTypeError, ParameterValueError

__all__ = [
    "BINDING_KEY",
    "MAX_MODULUS_BITS",
    "MIN_MODULUS_BITS",
    "MODULUS_BITS_KEY",
    "NAMES_KEY",
    "QuantizedDomain",
    "domain_of",
    "modulus_bits_of",
]

# SecAgg+ masks uint32 words, and 2**bits divides 2**32 for every bits up to 32.
MIN_MODULUS_BITS = 2
MAX_MODULUS_BITS = 32

MODULUS_BITS_KEY = "quantized.modulus-bits"
"""Config key (int) the secure aggregator's client mod sets on the train message it passes
inward: the reply arrays of the round's domain are summed modulo ``2**value``."""

NAMES_KEY = "quantized.names"
"""Config key (list of str) set beside :data:`MODULUS_BITS_KEY`: the domain's array names."""

BINDING_KEY = "quantized.binding"
"""Config key (bytes) set beside :data:`MODULUS_BITS_KEY` when the domain has a
:attr:`~QuantizedDomain.binding`: the digest the noising mod bound the round's encoding to."""

MAX_BINDING_BYTES = 64


def _name(name: str) -> None:
    if not name:
        raise ParameterValueError("every name of a quantized domain must be a non-empty str")


@dataclass(frozen=True, slots=True)
class QuantizedDomain:
    """Reply arrays that are residues modulo ``2**modulus_bits``, and how they are summed.

    Each array named in ``names`` holds residues in ``[0, modulus)`` (an
    unsigned-integer array); the round's sum of it is the sum over the
    participants modulo :attr:`modulus`, *unweighted* (the weight metric does not
    multiply it) and never divided. The point where noise is added is the
    client, before masking: the server only ever sees the masked residues and
    their modular sum.

    ``binding`` (``b""``: none; at most 64 bytes) is opaque here: a digest of
    whatever the noising mod sent the nodes for this round. The secure
    aggregator carries it in its round configuration and that configuration's
    digest, so in SecAgg+'s malicious mode every node that exchanges keys
    agrees on it; the noising mod inside the node checks what it received
    against it.
    """

    modulus_bits: int
    names: tuple[str, ...]
    binding: bytes = b""

    def __post_init__(self) -> None:
        integer(
            "modulus_bits", self.modulus_bits, at_least=MIN_MODULUS_BITS, at_most=MAX_MODULUS_BITS
        )
        names = strings("names", self.names, non_empty=True, unique=True, check=_name)
        binding = instance("binding", self.binding, bytes)
        if len(binding) > MAX_BINDING_BYTES:
            raise ParameterValueError(
                f"a domain's binding is a digest of at most {MAX_BINDING_BYTES} bytes"
            )
        object.__setattr__(self, "modulus_bits", int(self.modulus_bits))
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "binding", bytes(binding))

    @property
    def modulus(self) -> int:
        """``2**modulus_bits``."""
        return 1 << self.modulus_bits

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def check_residues(self, name: str, values: NDArray[np.generic]) -> NDArray[np.unsignedinteger]:
        """``values`` if they are residues of this domain: unsigned integers below the modulus.

        Anything else raises :class:`~flowerpets.exceptions.InvalidUpdateError`,
        whose message names the array and what is wrong, never a value (it may
        travel in the clear, and the values are what the domain protects).
        """
        array = np.asarray(values)
        if array.dtype.kind != "u":
            raise InvalidUpdateError(
                f"array {name!r} is summed modulo 2**{self.modulus_bits}: it must hold unsigned "
                f"integers (residues), not dtype kind {array.dtype.kind!r}"
            )
        if array.size and int(array.max()) >= self.modulus:
            raise InvalidUpdateError(
                f"array {name!r} holds a value outside [0, 2**{self.modulus_bits}): it is summed "
                "modulo that modulus and must hold residues only"
            )
        return array

    def config_entries(self) -> dict[str, ConfigValue]:
        """What the client mod sets in the inner train config: :data:`MODULUS_BITS_KEY`
        and :data:`NAMES_KEY`, and :data:`BINDING_KEY` when the domain has a binding."""
        entries: dict[str, ConfigValue] = {
            MODULUS_BITS_KEY: self.modulus_bits,
            NAMES_KEY: list(self.names),
        }
        if self.binding:
            entries[BINDING_KEY] = self.binding
        return entries


def modulus_bits_of(config: Mapping[str, ConfigValue]) -> int | None:
    """The modulus bits a train config says its reply's residues are summed modulo (or None).

    None when :data:`MODULUS_BITS_KEY` is absent: no secure aggregator that sums
    modulo runs outside the reader. A value that is no int in ``[2, 32]`` raises
    :class:`~flowerpets.exceptions.ParameterTypeError` or
    :class:`~flowerpets.exceptions.ParameterValueError`.
    """
    if MODULUS_BITS_KEY not in config:
        return None
    return integer(
        f"config[{MODULUS_BITS_KEY!r}]",
        config[MODULUS_BITS_KEY],
        at_least=MIN_MODULUS_BITS,
        at_most=MAX_MODULUS_BITS,
    )


def domain_of(config: Mapping[str, ConfigValue]) -> QuantizedDomain | None:
    """The whole domain a train config carries (:data:`MODULUS_BITS_KEY`,
    :data:`NAMES_KEY` and :data:`BINDING_KEY`, ``b""`` when absent), or None without
    :data:`MODULUS_BITS_KEY`."""
    bits = modulus_bits_of(config)
    if bits is None:
        return None
    names = config.get(NAMES_KEY)
    if not isinstance(names, list):
        raise ParameterTypeError(
            f"config[{NAMES_KEY!r}] must be a list of str beside config[{MODULUS_BITS_KEY!r}]"
        )
    binding = config.get(BINDING_KEY, b"")
    if not isinstance(binding, bytes):
        raise ParameterTypeError(f"config[{BINDING_KEY!r}] must be bytes")
    return QuantizedDomain(modulus_bits=bits, names=tuple(names), binding=binding)  # type: ignore[arg-type]

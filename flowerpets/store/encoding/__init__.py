"""What the store writes, and how it is read back: codec frames, canonical JSON, digests."""

from flowerpets.store.encoding.arrays import decode_arrays, encode_arrays, encode_arrays_parts
from flowerpets.store.encoding.canonical_json import canonical_json, json_digest, parse_json
from flowerpets.store.encoding.digest import check_digest, row_digest, row_hasher
from flowerpets.store.encoding.sampler_state import generator_from_state, generator_state

__all__ = [
    "canonical_json",
    "check_digest",
    "decode_arrays",
    "encode_arrays",
    "encode_arrays_parts",
    "generator_from_state",
    "generator_state",
    "json_digest",
    "parse_json",
    "row_digest",
    "row_hasher",
]

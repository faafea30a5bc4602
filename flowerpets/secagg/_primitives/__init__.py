"""Raw primitives of SecAgg+: the PRG, Shamir sharing, key agreement, share encryption
and the fixed-point encoding. Private: the package face exposes the protocol, not these.

Each module is small and tested against known answers (``tests/secagg/test_primitives.py``).
"""

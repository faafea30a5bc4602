"""``--he``: the digits demo with CKKS aggregation (:mod:`flowerpets.he`).

The server sums encrypted updates and keeps the global model encrypted; the
nodes decrypt it. The server cannot evaluate what it cannot read, so the
demo's centralized test accuracy is not available with ``--he``: use federated
evaluation (the nodes evaluate the model they decrypted on their test slices).
"""

from __future__ import annotations

import argparse

from flowerpets.examples.digits.apps import DigitsTask
from flowerpets.examples.digits.features import FeatureMods
from flowerpets.he import PARAMETER_SETS, CKKSClientMod, HomomorphicAggregation

__all__ = ["HEFeature"]


class HEFeature:
    """``--he``, ``--he-params {compact,wide}``, ``--he-encrypt PATTERN`` (repeatable)."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("homomorphic encryption (CKKS)")
        group.add_argument(
            "--he",
            action="store_true",
            help="sum CKKS-encrypted updates; the server never holds a decryption key",
        )
        group.add_argument(
            "--he-params",
            choices=sorted(PARAMETER_SETS),
            default="compact",
            help="CKKS parameter set (compact: ring 4096, 8x float32; wide: ring 8192, 16x)",
        )
        group.add_argument(
            "--he-encrypt",
            action="append",
            metavar="PATTERN",
            help="encrypt only arrays matching this name or glob (repeatable; default: all)",
        )

    def mods(self, args: argparse.Namespace, task: DigitsTask) -> FeatureMods:
        if not args.he:
            return FeatureMods()
        params = PARAMETER_SETS[args.he_params]
        patterns = tuple(args.he_encrypt or ("*",))
        which = "all arrays" if patterns == ("*",) else ", ".join(patterns)
        return FeatureMods(
            client=[CKKSClientMod(encrypt=patterns)],
            server=[HomomorphicAggregation(encrypt=patterns, params=params)],
            summary=f"CKKS aggregation ({params.name}: {params.describe()}; encrypting {which})",
            needs_federated_evaluation=True,
        )

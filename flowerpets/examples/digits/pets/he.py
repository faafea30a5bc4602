"""``--he``: the digits demo with CKKS aggregation (:mod:`flowerpets.he`).

The server sums encrypted updates and keeps the global model encrypted; the
nodes decrypt it. The server cannot evaluate what it cannot read, so the
demo's centralized test accuracy is not available with ``--he``: the demo
turns on federated evaluation (the nodes evaluate the model they decrypted on
their test slices) and reports that accuracy instead. ``--he-params`` and
``--he-encrypt`` need ``--he``; a pattern that matches none of the model's
arrays is refused before the run.
"""

from __future__ import annotations

import argparse
import fnmatch

import numpy as np

from flowerpets.examples.digits.apps import DigitsTask
from flowerpets.examples.digits.features import FeatureMods
from flowerpets.exceptions import ParameterValueError
from flowerpets.he import PARAMETER_SETS, CKKSClientMod, HomomorphicAggregation

__all__ = ["HEFeature"]

DEFAULT_PARAMS = "compact"


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
            default=None,
            help="CKKS parameter set (compact, the default: ring 4096, 8x float32; "
            "wide: ring 8192, 16x)",
        )
        group.add_argument(
            "--he-encrypt",
            action="append",
            metavar="PATTERN",
            help="encrypt only arrays matching this name or glob (repeatable; default: all)",
        )

    def mods(self, args: argparse.Namespace, task: DigitsTask) -> FeatureMods:
        if not args.he:
            given = [
                f
                for f, v in (("--he-params", args.he_params), ("--he-encrypt", args.he_encrypt))
                if v
            ]
            if given:
                raise ParameterValueError(
                    f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --he"
                )
            return FeatureMods()
        params = PARAMETER_SETS[args.he_params or DEFAULT_PARAMS]
        patterns = tuple(args.he_encrypt or ("*",))
        if task is not None:
            _check_patterns(patterns, task)
        which = "all arrays" if patterns == ("*",) else ", ".join(patterns)
        return FeatureMods(
            client=[CKKSClientMod(encrypt=patterns)],
            server=[HomomorphicAggregation(encrypt=patterns, params=params)],
            summary=f"CKKS aggregation ({params.name}: {params.describe()}; encrypting {which}; "
            "the server cannot read the model, so the nodes measure its accuracy on their "
            "test slices)",
            needs_federated_evaluation=True,
        )


def _check_patterns(patterns: tuple[str, ...], task: DigitsTask) -> None:
    """Refuse a pattern that matches no array of the model: a typo would fail every round."""
    names = list(task.model.init_params(np.random.default_rng(0)))
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ParameterValueError(
            f"--he-encrypt {' '.join(unmatched)} matches none of the model's arrays "
            f"({', '.join(names)})"
        )

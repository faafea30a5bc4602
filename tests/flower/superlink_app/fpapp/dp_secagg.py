"""Central DP over SecAgg+ (clipping on the nodes, seeded noise on the server)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from flowerpets.core import ServerMod
from flowerpets.dp import CentralDp, fixed_clipping_mod
from flowerpets.exceptions import InsecureRandomnessWarning
from flowerpets.flower import client_app, server_app
from flowerpets.secagg import SecAggPlus, secaggplus_mod

from .apps import numpy_client, numpy_server, values


def server_mods() -> Sequence[ServerMod]:
    """The noise is seeded so that the test's own simulation draws the same.

    ``keep_client_metrics``: the round then reports SecAgg+'s own metrics, its
    ``secagg-mean-error-bound`` among them, which the test compares within (they are
    released without noise, which it warns about: fine for a test, not for a study).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureRandomnessWarning)
        warnings.filterwarnings("ignore", "CentralDp.keep_client_metrics=True", UserWarning)
        dp = CentralDp(
            noise_multiplier=0.5,
            clipping_norm=1.0,
            rng=np.random.default_rng(3),
            keep_client_metrics=True,
        )
    return [dp, SecAggPlus()]


ours = numpy_client([secaggplus_mod, fixed_clipping_mod])
build = numpy_server(server_mods, evaluate_fn=values)
client = client_app(ours)
server = server_app(build)

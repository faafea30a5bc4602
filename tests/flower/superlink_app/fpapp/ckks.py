"""CKKS (HomomorphicAggregation and ckks_mod); one node evaluates, i.e. opens, the sum."""

from __future__ import annotations

from flowerpets.core import FixedSizeSampling
from flowerpets.flower import client_app, server_app
from flowerpets.he import HomomorphicAggregation, ckks_mod

from .apps import numpy_client, numpy_server

CKKS_SUM_ERROR = 1e-8
"""The documented bound on a decrypted COMPACT sum's absolute error (docs/he.md, Parameters;
asserted by tests/he/test_params.py); the mean divides it by the total weight (>= 1)."""

ours = numpy_client([ckks_mod])
build = numpy_server(lambda: [HomomorphicAggregation()], evaluate_sampling=FixedSizeSampling(1))
client = client_app(ours)
server = server_app(build)

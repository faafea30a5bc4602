"""SecAgg+ (our SecAggPlus and secaggplus_mod) on the plain app of ``apps.py``."""

from __future__ import annotations

from flowerpets.flower import client_app, server_app
from flowerpets.secagg import SecAggPlus, secaggplus_mod

from .apps import numpy_client, numpy_server, values

ours = numpy_client([secaggplus_mod])
build = numpy_server(lambda: [SecAggPlus()], evaluate_fn=values)
client = client_app(ours)
server = server_app(build)

"""Central differential privacy for federated averaging (user-level DP-FedAvg).

:class:`CentralDp` is a server mod. Each round it

1. works out the round's privacy event from the sampling the strategy really
   used (``request.sampling``: Poisson, fixed-size without replacement, or full
   participation; see :func:`~flowerpets.dp.accountant.event_for_round`) and,
   given a budget, refuses the round *before any node sees it* if composing the
   event would exceed the budget (``StopRunError``: the ServerApp ends the run
   and returns what it has, with the reason in ``RunResult.stopped``);
2. asks for uniform weights (``request.weight_key = None``) and, when the
   clients clip, sends the clip in the config (``dp.clip``);
3. lets the inner chain collect the **sum of clipped updates** (each update is
   new weights minus the global weights, clipped to L2 norm C by the client
   mods in :mod:`flowerpets.dp.clipping`, or by this mod when it clips on the
   server);
4. adds Gaussian noise of standard deviation ``z C`` to that sum, adds back
   ``m`` times the global model, and sets the total weight to ``m``, the
   *expected* cohort size ``request.sampling.expected_size(request.population)``,
   so FedAvg's mean is exactly

       w + (sum of clipped updates + N(0, (z C)^2)) / m,

   the fixed-denominator estimator of McMahan et al. (ICLR 2018), whose noise
   on the mean is ``z C / m``;
5. records the event with the accountant and reports ``epsilon`` (at
   ``delta``) in the round's metrics (``history.round(n).train_metrics``).

The run's privacy state (the ledger of events with their counts, and the clip)
lives in the run's context, ``context.state["dp.central"]``, as explicit JSON
events in a record written by :class:`~flowerpets.core.state.StateSlot`; the
accountant, the epsilon spent and the rounds counted are derived from the ledger. The mod keeps
nothing per run, so one instance serves any number of runs, and a run's budget
is never forgotten while its context lives. A ledger it cannot read stops the
run (``StopRunError``) rather than restart the budget.

The noise is added through :meth:`RoundResult.add_to_sum`, so it works on a
plain sum and on a sealed one (homomorphic encryption) alike.

**Fewer replies than expected.** The denominator stays ``m`` and the noise stays
``z C``: both depend on the clip, not on who replied, so the privacy guarantee
and the accountant's event are unchanged. What changes is utility: with ``m'``
replies the mean update is scaled by about ``m' / m``, so the model moves less
(towards the previous one) and the noise weighs relatively more. Dividing by
``m'`` instead would make the release depend on the number of participants,
which is exactly what DP must not reveal. A round in which nobody replied
(an empty Poisson cohort, say) still releases ``w + noise / m``: the result is
marked ``fixed_denominator``, so FedAvg does not fail it for having fewer than
``min_nodes`` participants, which would reveal how many replied. (An inner
exchange that needs a quorum, SecAgg+'s, still fails a round that is too small
for it; that fact is outside the accounting.)

**Adaptive clipping** (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021):
each client reports ``b_i - 1/2`` with ``b_i = 1`` if its update's norm was at
most ``C`` (*unclipped*, not clipped); the server adds N(0, sigma_b^2) to the
sum (default ``sigma_b = m / 20``), estimates the unclipped fraction
``b = (sum + noise) / m + 1/2`` and sets ``C <- C exp(-eta (b - gamma))``. The
two noises share the budget: the update's multiplier is
``z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (requires ``2 sigma_b > z``), and the
pair is accounted as one Gaussian of multiplier ``z``.

**Where the clipping happens.** ``ClipOn.CLIENTS`` (default) has each
client run a clipping mod, and composes with secure aggregation: the
clipped update (and the indicator, in the reserved array ``dp.unclipped``)
are summed securely and the server noises only the sum. Without secure
aggregation the server checks every reply before it is summed: a reply whose
norm exceeds the clip it sent (a client without a clipping mod replies with its
weights), or whose indicator is not +-1/2, is refused and recorded as that
node's ``INVALID_REPLY`` failure, with a reason that carries no value of the
reply. Under secure aggregation (or with a sealed model) the server sees only
the sum and cannot check: it trusts every client to clip, and one client that
does not can move the model as far as it likes, the noise notwithstanding.
``ClipOn.SERVER`` needs every update one by one, so it refuses to run when an
app's mod declares secure aggregation, or when the sum comes back sealed.

What it does not protect: the clients' own train metrics (loss, number of
examples) are averages of private data released without noise, so this mod
drops every metric the inner chain returns from the round's metrics unless
``keep_client_metrics=True``. The
number of available nodes (hence ``m``) is treated as public, as is the
fact that a round failed.

The modules, one idea each: ``_mod`` (the mod, one round in order),
``_ledger`` (the run's state and its accounting), ``_sites`` (where the
updates are clipped) over ``_checking_grid`` (the server's check of each
reply), ``_release`` (the noise: its calibration and the noised sum) and
``_adaptive`` (adaptive clipping's settings and step).
"""

from __future__ import annotations

from flowerpets.dp.central._adaptive import AdaptiveClipping
from flowerpets.dp.central._ledger import STATE_KEY as STATE_KEY
from flowerpets.dp.central._mod import CentralDp
from flowerpets.dp.central._sites import ClipOn

__all__ = ["AdaptiveClipping", "CentralDp", "ClipOn"]

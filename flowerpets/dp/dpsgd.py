"""Sample-level DP-SGD inside a client's local PyTorch training, with Opacus.

Where :class:`~flowerpets.dp.CentralDp` protects each *client* (user-level DP),
DP-SGD protects each *training example* of a client against everyone who sees
the client's updates, the server included (Abadi et al., CCS 2016). A train
handler calls :meth:`DpSgd.train`:

.. code-block:: python

    dpsgd = DpSgd(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, batch_size=32)

    @app.train()
    def train(msg, context):
        model.load_state_dict(...)                   # the received global weights
        report = dpsgd.train(model, dataset, context)
        # num-examples = 1 and the epsilon; not the dataset size or the loss (see metrics()).
        return RecordDict({"arrays": ..., "metrics": MetricRecord(report.metrics())})

Each call runs ``epochs`` epochs of DP-SGD with Opacus's building blocks:
per-example gradients (``GradSampleModule``), Poisson sampling of each batch
(``DPDataLoader``, rate ``q = 1 / ceil(n / batch_size)``), per-example
clipping to ``max_grad_norm`` and Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` on every summed gradient
(``DPOptimizer``). The noise comes from this package's AES-CTR source (see
:mod:`flowerpets.dp._primitives.noise`), not from torch's Mersenne Twister;
the Poisson sampling uses a torch generator seeded from the OS's secure source
each round (only its secrecy matters for the amplification argument).

Across rounds the node keeps its own accountant state in
``context.state["dp.sgd"]`` (written by :class:`~flowerpets.core.state.StateSlot`):
the steps taken at each (noise multiplier, sample rate). The reported epsilon
composes all of them (PLD by default, see :mod:`flowerpets.dp.accountant`), so
it is this client's sample-level epsilon for the whole run so far. With
``max_epsilon`` a round that would exceed it is refused before any training
(``REFUSED`` reply), and so is every round once the state cannot be read (the
budget is never forgotten). :class:`DpSgd` itself keeps no per-node state: it
pickles, and builds its secure noise source on first use.

That state lives on the node: a server's run store never holds it. DpSgd runs
inside a train handler, where no runtime sees it, so a stored simulation is
not refused (as one with :class:`~flowerpets.dp.LocalDpMod` is): resumed, its
rebuilt nodes count their epsilon from 0 again (see ``docs/dp.md``).

torch and Opacus are imported only when :meth:`DpSgd.train` runs: install the
``dpsgd`` extra (``pip install 'flowerpets[dpsgd]'``); the rest of
:mod:`flowerpets.dp` works without them.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from flowerpets._validation import integer, probability, real
from flowerpets.core import WEIGHT_KEY, Context
from flowerpets.core.state import StateSlot
from flowerpets.dp._primitives.noise import GaussianSource, lazy_gaussian_source
from flowerpets.dp.accountant import (
    AccountantFactory,
    PldAccountant,
    PoissonSampledGaussian,
)
from flowerpets.exceptions import (
    MissingDependencyError,
    ParameterTypeError,
    ParameterValueError,
    RequestRefusedError,
    StateError,
)

__all__ = ["DpSgd", "DpSgdReport"]

STATE_KEY = "dp.sgd"


@dataclass(frozen=True, slots=True)
class _Steps:
    """A node's DP-SGD history: ``steps[i]`` steps at ``noise_multipliers[i]``, ``sample_rates[i]``.

    Read strictly (a negative step count would give budget back); epsilon derives from it.
    """

    noise_multipliers: tuple[float, ...] = ()
    sample_rates: tuple[float, ...] = ()
    steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not len(self.noise_multipliers) == len(self.sample_rates) == len(self.steps):
            raise ParameterValueError("the DP-SGD history's lists differ in length")
        # Secret: the sample rate and the steps tell the dataset's size.
        for z, q, n in zip(self.noise_multipliers, self.sample_rates, self.steps, strict=True):
            real("a noise multiplier", z, above=0, secret=True)
            probability("a sample rate", q, zero=False, secret=True)
            integer("a step count", n, at_least=1, secret=True)
        if len(set(self._settings())) != len(self.steps):
            raise ParameterValueError("the DP-SGD history lists a setting twice")

    def _settings(self) -> zip[tuple[float, float]]:
        return zip(self.noise_multipliers, self.sample_rates, strict=True)

    @classmethod
    def of(cls, history: dict[tuple[float, float], int]) -> _Steps:
        keys = list(history)
        return cls(
            noise_multipliers=tuple(z for z, _ in keys),
            sample_rates=tuple(q for _, q in keys),
            steps=tuple(history[k] for k in keys),
        )

    def history(self) -> dict[tuple[float, float], int]:
        return dict(zip(self._settings(), self.steps, strict=True))


_SLOT = StateSlot(_Steps, STATE_KEY)


@dataclass(frozen=True, slots=True)
class DpSgdReport:
    """One round of DP-SGD on a node, and the node's privacy spent so far."""

    epsilon: float  # the node's sample-level epsilon over all its rounds, at delta
    delta: float
    steps: int  # optimizer steps this round
    sample_rate: float  # Poisson sampling rate of each batch
    loss: float  # mean training loss over this round's non-empty batches
    examples: int  # size of the local training set

    def metrics(self, *, unprotected: bool = False) -> dict[str, float | int]:
        """Reply metrics that the DP-SGD guarantee covers, or, asked for, more.

        By default: ``dp-sample-epsilon``, ``dp-sample-delta`` and ``num-examples =
        1``, so FedAvg (and SecAgg+) weighs this client like any other. The exact
        number of examples and the training loss are facts about the local data
        that no noise covers: ``unprotected=True`` adds them (``num-examples`` is
        then the dataset size, and ``train-loss``), and warns.

        What the default still reveals: the epsilon is a function of the noise
        multiplier, the rounds and the sample rate ``1 / ceil(n / batch_size)``,
        so it tells the dataset size ``n`` to within ``batch_size``; the model
        update reveals as much through its number of noised steps. DP-SGD's
        analysis treats that sample rate as public, as Opacus does.
        """
        if not unprotected:
            return {
                "dp-sample-epsilon": self.epsilon,
                "dp-sample-delta": self.delta,
                WEIGHT_KEY: 1,
            }
        warnings.warn(
            "DpSgdReport.metrics(unprotected=True) sends the exact number of examples and the "
            "training loss: the DP-SGD guarantee does not cover them",
            UserWarning,
            stacklevel=2,
        )
        return {
            "dp-sample-epsilon": self.epsilon,
            "dp-sample-delta": self.delta,
            WEIGHT_KEY: self.examples,
            "train-loss": self.loss,
        }


def _require_torch() -> tuple[Any, Any]:
    try:
        import opacus
        import torch
    except ImportError as exc:  # the dpsgd extra is missing
        raise MissingDependencyError(
            "DP-SGD needs torch and opacus: pip install 'flowerpets[dpsgd]'"
        ) from exc
    return torch, opacus


@cache
def _secure_optimizer_class() -> type:
    """A DPOptimizer whose noise comes from a GaussianSource (defined once torch is imported)."""
    import torch
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class SourcedNoiseDPOptimizer(DPOptimizer):  # type: ignore[misc]
        """Opacus's DPOptimizer, with ``add_noise`` drawing from our secure source."""

        def __init__(self, *args: Any, source: GaussianSource, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._source = source

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = self._source.normal(std, tuple(p.summed_grad.shape))
                tensor = torch.from_numpy(noise).to(
                    dtype=p.summed_grad.dtype, device=p.summed_grad.device
                )
                p.grad = (p.summed_grad + tensor).view_as(p)
                _mark_as_processed(p.summed_grad)

    return SourcedNoiseDPOptimizer


class DpSgd:
    """DP-SGD settings for a node's local training; :meth:`train` runs one round of it.

    ``noise_multiplier`` is the noise over ``max_grad_norm`` (the per-example
    clip). ``delta`` is where epsilon is reported; ``max_epsilon`` the node's
    budget. ``accountant`` makes the accountant (default PLD). ``rng``
    replaces the secure noise and sampling seeds with a seeded generator, for
    tests only (it warns).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float,
        batch_size: int,
        epochs: int = 1,
        learning_rate: float = 0.1,
        max_epsilon: float | None = None,
        accountant: AccountantFactory = PldAccountant,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.noise_multiplier = real("noise_multiplier", noise_multiplier, above=0)
        self.max_grad_norm = real("max_grad_norm", max_grad_norm, above=0)
        self.delta = probability("delta", delta, zero=False, one=False)
        self.batch_size = integer("batch_size", batch_size, at_least=1)
        self.epochs = integer("epochs", epochs, at_least=1)
        self.learning_rate = real("learning_rate", learning_rate, above=0)
        if max_epsilon is not None:
            max_epsilon = real("max_epsilon", max_epsilon, above=0)
        self.max_epsilon = max_epsilon
        if not callable(accountant):
            raise ParameterTypeError(
                f"accountant must make an Accountant, got {type(accountant).__name__}"
            )
        self.accountant = accountant
        self._rng = rng
        # Built on first use and never pickled (a copy draws under a key of its own).
        self._noise = lazy_gaussian_source(rng, owner="DpSgd")

    def __repr__(self) -> str:
        return (
            f"DpSgd(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, "
            f"delta={self.delta}, batch_size={self.batch_size}, epochs={self.epochs})"
        )

    # -- the node's accountant state -------------------------------------------------------------
    @staticmethod
    def history(context: Context) -> dict[tuple[float, float], int]:
        """Steps taken so far on this node, by (noise multiplier, sample rate)."""
        # Corrupt state refuses (the budget is not forgotten); the reason names a field, no value.
        try:
            return _SLOT.get(context.state, _Steps()).history()
        except StateError as exc:
            raise RequestRefusedError(f"the node's {STATE_KEY!r} state is corrupt: {exc}") from None

    def epsilon_of(self, history: dict[tuple[float, float], int]) -> float:
        """The epsilon at ``delta`` of ``history`` (as :meth:`history` returns it)."""
        accountant = self.accountant()
        for (z, q), steps in history.items():
            accountant.compose(PoissonSampledGaussian(z, q), steps)
        return accountant.get_epsilon(self.delta)

    def spent(self, context: Context) -> float:
        """This node's sample-level epsilon so far, at ``delta``."""
        return self.epsilon_of(self.history(context))

    # -- one round -------------------------------------------------------------------------------
    def _seed(self) -> int:
        if self._rng is not None:
            return int(self._rng.integers(0, 2**63 - 1))
        return secrets.randbits(63)

    def train(
        self,
        model: Any,
        dataset: Any,
        context: Context,
        *,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        optimizer: Callable[[Iterable[Any]], Any] | None = None,
    ) -> DpSgdReport:
        """Train ``model`` in place on ``dataset`` (a map-style torch Dataset of ``(x, y)``).

        ``loss_fn`` defaults to cross-entropy (mean over the batch);
        ``optimizer`` makes the base optimizer from the parameters (default SGD
        at ``learning_rate``). Raises ``RequestRefusedError`` before training if
        the round would exceed ``max_epsilon``.
        """
        torch, _ = _require_torch()
        from opacus import GradSampleModule
        from opacus.data_loader import DPDataLoader

        examples = len(dataset)
        if examples < 1:
            raise ParameterValueError("DP-SGD needs a non-empty training set")
        generator = torch.Generator()
        generator.manual_seed(self._seed())
        loader = DPDataLoader.from_data_loader(
            torch.utils.data.DataLoader(dataset, batch_size=min(self.batch_size, examples)),
            generator=generator,
        )
        rate = float(loader.sample_rate)
        steps = self.epochs * len(loader)
        history = self.history(context)
        key = (self.noise_multiplier, rate)
        after = dict(history)
        after[key] = after.get(key, 0) + steps
        epsilon = self.epsilon_of(after)
        if self.max_epsilon is not None and epsilon > self.max_epsilon:
            # Not the epsilon itself: through the sample rate it depends on the dataset size.
            raise RequestRefusedError(
                f"DP-SGD budget: this round would raise the node's epsilon above "
                f"max_epsilon={self.max_epsilon:g} (delta={self.delta:g})"
            )
        criterion = loss_fn if loss_fn is not None else torch.nn.CrossEntropyLoss()
        wrapped = GradSampleModule(model)
        base = (
            optimizer(wrapped.parameters())
            if optimizer is not None
            else torch.optim.SGD(wrapped.parameters(), lr=self.learning_rate)
        )
        dp_optimizer = _secure_optimizer_class()(
            base,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=max(1, round(rate * examples)),
            source=self._noise,
        )
        # Opacus's per-example hooks on a first layer whose input needs no gradient make torch
        # warn on every backward pass: expected and harmless. The filter stays (a filter set
        # and restored per call would race: a simulation trains many nodes on threads);
        # adding it again only moves it to the front.
        warnings.filterwarnings(
            "ignore",
            message="Full backward hook is firing when gradients are computed with respect "
            "to module outputs since no inputs require gradients",
            category=UserWarning,
        )
        losses: list[float] = []
        try:
            wrapped.train()
            for _ in range(self.epochs):
                for x, y in loader:
                    dp_optimizer.zero_grad()
                    if len(x) == 0:
                        # An empty Poisson batch still takes a step: a noised zero gradient.
                        (wrapped(x).sum() * 0.0).backward()
                        dp_optimizer.step()
                        continue
                    loss = criterion(wrapped(x), y)
                    loss.backward()
                    dp_optimizer.step()
                    losses.append(float(loss.detach()))
        finally:
            wrapped.to_standard_module()  # removes Opacus's hooks; the model stays trained
        _SLOT.store(context.state, _Steps.of(after))
        return DpSgdReport(
            epsilon=epsilon,
            delta=self.delta,
            steps=steps,
            sample_rate=rate,
            loss=float(np.mean(losses)) if losses else math.nan,
            examples=examples,
        )

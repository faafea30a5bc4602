"""Our apps through Flower's deployment runtime: a real SuperLink and 4 SuperNodes on loopback.

One :class:`~flowerpets.flower.deployment.LocalDeployment` for the whole module
(``flower-superlink --insecure`` and 4 ``flower-supernode`` processes on
127.0.0.1, free ports, every process and child stopped by PID, a hard time
limit); each test is one ``flwr run`` of an app of ``superlink_app/fpapp``
(plain, SecAgg+, CentralDp+SecAgg+, CKKS), 1 round, compared with our own
``run_simulation`` of the very same app objects on the same seeds (SecAgg+'s
malicious mode against our semi-honest simulation: the SuperNodes' identity keys
are named in their node config, the PKI ships with the app). 4 nodes: a
SecAgg+ cohort of 3 cannot lose one (each survivor needs t=2 surviving
neighbours in a degree-2 graph), a cohort of 4 can.

The SIGKILL test ends a SuperNode for good, so it comes last in this module.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

psutil = pytest.importorskip("psutil")

from flowerpets.core import ClientApp, ServerApp  # noqa: E402
from flowerpets.flower import Settings  # noqa: E402
from flowerpets.flower.deployment import (  # noqa: E402
    ConfigScalar,
    LocalDeployment,
    NodeConfig,
    default_node_config,
    free_port,
)
from flowerpets.secagg import IdentityKey, NodeIdentities  # noqa: E402
from flowerpets.secagg.identity import IDENTITY_KEY_CONFIG  # noqa: E402
from flowerpets.secagg.protocol import Stage  # noqa: E402
from flowerpets.simulation import Dropout, run_simulation  # noqa: E402
from tests.flower.superlink_app.fpapp import apps  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.deployment]
APP = Path(__file__).parent / "superlink_app"
IDENTITIES = "identities"  # the folder of the SuperNodes' identity keys, in the deployment's home
N = 4
F32 = float(np.finfo(np.float32).eps)  # each side casts its mean to the float32 model

_free_port = free_port  # test_template's simulation test takes its ports from here


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def deployment_fixture(
    n: int, hard_limit: float, *, identities: bool = False
) -> Callable[..., Iterator[LocalDeployment]]:
    """A module-scoped fixture: one deployment of ``n`` SuperNodes for the module's tests.

    ``identities``: each SuperNode gets an Ed25519 identity key, a PEM file in
    ``home/identities`` that its node config names (``secagg-identity-key``), as
    docs/secagg.md's Flower identities say; the PKI is the test's to write (the
    SuperLink draws the node ids).
    """

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
        home = tmp_path_factory.mktemp("superlink")
        node_config = default_node_config
        if identities:
            node_config = _with_identity_keys(home / IDENTITIES, n)
        deployment = LocalDeployment(n, home=home, hard_limit=hard_limit, node_config=node_config)
        with deployment:
            yield deployment
            seen = deployment.pids()
        assert seen, "the deployment had no processes left to stop"
        left = [pid for pid in seen if not _gone(pid)]
        assert not left, f"processes still running: {left}"

    return fixture


def _with_identity_keys(folder: Path, n: int) -> NodeConfig:
    folder.mkdir()
    for i in range(n):
        path = folder / f"node-{i}.pem"
        path.touch(mode=0o600)
        path.write_bytes(IdentityKey.generate().private_pem())

    def node_config(i: int, n: int) -> dict[str, ConfigScalar]:
        return {**default_node_config(i, n), IDENTITY_KEY_CONFIG: str(folder / f"node-{i}.pem")}

    return node_config


def _identity(link: LocalDeployment, i: int) -> IdentityKey:
    return IdentityKey.from_pem((link.home / IDENTITIES / f"node-{i}.pem").read_bytes())


superlink = deployment_fixture(3, 240.0)  # test_template's: its app wants 3 participants
link = deployment_fixture(N, 540.0, identities=True)


def _flwr_run(
    link: LocalDeployment, module: str, files: dict[str, str] | None = None, **run_config: Any
) -> list[dict[str, Any]]:
    """``flwr run`` the app of ``fpapp/<module>.py`` for 1 round; its History as dicts.

    ``files``: written into the copy of the app that runs (path in it -> text).
    """
    work = link.home / f"run-{module}"
    app = work / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in (files or {}).items():
        (app / name).write_text(text, encoding="utf-8")
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("fpapp.apps:", f"fpapp.{module}:"))
    history = work / "history.json"
    config = {"history-file": str(history), "min-nodes": N, "num-server-rounds": 1, **run_config}
    done = link.run(app, run_config=config)
    (work / "flwr-run.log").write_text(done.stdout + done.stderr)
    assert history.exists(), (done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    rounds: list[dict[str, Any]] = json.loads(history.read_text())
    assert [r["round"] for r in rounds] == [1], rounds
    return rounds


def _ours(module: Any, **kwargs: Any) -> Any:
    """Our own simulation of ``fpapp/<module>.py``'s very apps, 1 round, same seeds."""
    server = module.build(Settings(num_rounds=1, seed=1))
    assert isinstance(server, ServerApp) and isinstance(module.ours, ClientApp)
    return run_simulation(server, module.ours, N, seed=1, **kwargs).history[0]


def _close(got: dict[str, float], want: dict[str, float], atol: float) -> None:
    assert list(got) == list(want)
    np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=0, atol=atol)


def _f32(values: dict[str, float]) -> float:
    return F32 * max(abs(v) for v in values.values())


def _model(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k[:2] in ("w[", "b[")}


def test_plain_fedavg_through_a_superlink(link: LocalDeployment) -> None:
    got = _flwr_run(link, "apps")[0]
    assert got["participants"] == N and got["error"] is None, got
    want = _ours(apps)
    assert got["train_metrics"] == want.train_metrics
    # Reply order differs: float64 sums in another order, then the float32 model.
    _close(got["server_metrics"], dict(want.server_metrics), atol=_f32(want.server_metrics))


def test_central_dp_with_secagg_through_a_superlink(link: LocalDeployment) -> None:
    from tests.flower.superlink_app.fpapp import dp_secagg

    got = _flwr_run(link, "dp_secagg")[0]
    assert got["participants"] == N and got["error"] is None, got
    want = _ours(dp_secagg)
    assert got["train_metrics"]["epsilon"] == want.train_metrics["epsilon"] > 0
    # Same seeded noise; each side's quantization is within its reported bound.
    bounds = got["train_metrics"]["secagg-mean-error-bound"]
    bounds += want.train_metrics["secagg-mean-error-bound"]
    _close(got["server_metrics"], dict(want.server_metrics), bounds + _f32(want.server_metrics))


def test_ckks_through_a_superlink(link: LocalDeployment) -> None:
    from tests.flower.superlink_app.fpapp import ckks

    got = _flwr_run(link, "ckks")[0]
    assert got["participants"] == N and got["error"] is None, got
    want = _ours(ckks)
    # The sum stays sealed on the server: the node that evaluates opens it and reports it.
    opened, ours = _model(got["evaluate_metrics"]), _model(dict(want.evaluate_metrics))
    assert len(opened) == 13
    _close(opened, ours, 2 * ckks.CKKS_SUM_ERROR + _f32(ours))


def test_malicious_secagg_through_a_superlink_refuses_a_node_not_enrolled(
    link: LocalDeployment,
) -> None:
    """The malicious mode (signed keys, the consistency check) with the identities
    provisioned as under Flower: keys in the node config, the PKI shipped with the app.
    The PKI enrolls 3 of the 4 SuperNodes: the server excludes the 4th, whose key
    nobody can verify (every honest node would refuse a ring order with it), and the
    other 3 sum as our semi-honest simulation in which the 4th drops at the first stage."""
    from tests.flower.superlink_app.fpapp import secagg

    ids = [node for node in link.node_ids if node is not None]
    assert len(ids) == N
    outsider = N - 1
    pki = NodeIdentities(
        {ids[i]: _identity(link, i).public_bytes for i in range(N) if i != outsider}
    )
    shipped = {"fpapp/identities.json": json.dumps({"identities": pki.to_text()})}
    got = _flwr_run(link, "malicious", files=shipped)[0]
    assert got["error"] is None and got["participants"] == N - 1, got
    assert list(got["failures"]) == [str(ids[outsider])], got["failures"]
    assert "not enrolled" in got["failures"][str(ids[outsider])]
    metrics = got["train_metrics"]
    assert "secagg-seconds-consistency-check" in metrics  # the malicious mode's own stage ran
    assert metrics["secagg-degree"] == 2 and metrics["secagg-threshold"] == 2  # n = 3
    assert metrics["num-examples"] == 6  # weights 1 + 2 + 3: the outsider's 4 is out
    want = _ours(secagg, faults=[Dropout(outsider, round=1, stage=Stage.ADVERTISE_KEYS)])
    assert len(want.participants) == N - 1 and want.train_metrics["num-examples"] == 6
    bounds = metrics["secagg-mean-error-bound"] + want.train_metrics["secagg-mean-error-bound"]
    _close(got["server_metrics"], dict(want.server_metrics), bounds + _f32(want.server_metrics))


def test_secagg_survives_a_node_killed_in_the_masked_input_stage(link: LocalDeployment) -> None:
    from tests.flower.superlink_app.fpapp import secagg

    victim = N - 1
    marker = link.home / "stalled"
    killed: dict[str, Any] = {}
    done = threading.Event()

    def kill_when_stalled() -> None:
        # The victim's train handler (inside collect-masked-input) writes the marker, then
        # waits: its SuperNode, superexec and ClientApp die together, mid-stage.
        while not done.is_set() and not marker.exists():
            time.sleep(0.05)
        if marker.exists():
            killed["clientapp"] = int(marker.read_text())
            killed["pids"] = link.kill_node(victim)

    killer = threading.Thread(target=kill_when_stalled, daemon=True)
    killer.start()
    try:
        # node-timeout 0: after the kill, the evaluate phase asks for the connected nodes,
        # and min-nodes would have it wait for a 4th that never comes (the deployment
        # waited for all 4 before the first run, so the round starts with them).
        stall = {"stall-partition": victim, "stall-marker": str(marker), "node-timeout": 0.0}
        got = _flwr_run(link, "secagg", **stall)[0]
    finally:
        done.set()
        killer.join(timeout=10)
    assert killed, "the victim's train handler never ran"
    assert killed["clientapp"] in killed["pids"] and not link.node_alive(victim)
    assert got["error"] is None and got["participants"] == N - 1, got
    assert list(got["failures"]) == [str(link.node_ids[victim])], got["failures"]
    (failure,) = got["failures"].values()
    assert Stage.COLLECT_MASKED_INPUT.value in failure, failure
    assert got["train_metrics"]["secagg-unmask-missing"] == 0
    want = _ours(secagg, faults=[Dropout(victim, round=1, stage=Stage.COLLECT_MASKED_INPUT)])
    assert len(want.participants) == N - 1 and want.train_metrics["num-examples"] == 6
    assert got["train_metrics"]["num-examples"] == 6  # weights 1 + 2 + 3: the victim's 4 is out
    bounds = got["train_metrics"]["secagg-mean-error-bound"]
    bounds += want.train_metrics["secagg-mean-error-bound"]
    _close(got["server_metrics"], dict(want.server_metrics), bounds + _f32(want.server_metrics))

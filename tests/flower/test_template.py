"""``flowerpets new``: the Flower app it writes parses, names its components, and runs.

Fast: the generated files parse (ast), the pyproject and the federation load
with tomllib, the mods come in the documented order, bad arguments exit 2 with
one line, and the generated app's own test runs its ClientApp and ServerApp
in-process. Slow: the generated app under ``flwr run . --stream`` in flwr's
simulation (3 nodes, 2 rounds), and through the SuperLink fixture of
``test_superlink.py`` unchanged.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from flowerpets.cli import main
from flowerpets.new import render, write_app
from tests.flower import test_superlink as link

superlink = link.superlink  # the SuperLink fixture (3 SuperNodes), reused unchanged

COMBOS = [(), ("dp",), ("secagg",), ("he",), ("dp", "secagg"), ("dp", "he")]
BIN = Path(sys.executable).parent


def _call(node: ast.Module, func: str) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(node)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == func
    ]


@pytest.mark.parametrize("pets", COMBOS, ids=lambda p: ",".join(p) or "none")
def test_generated_files_parse_and_name_the_components(pets: tuple[str, ...]) -> None:
    files = render("myapp", pets)
    trees = {path: ast.parse(text, path) for path, text in files.items() if path.endswith(".py")}
    assert set(trees) == {
        "myapp/__init__.py",
        "myapp/task.py",
        "myapp/client_app.py",
        "myapp/server_app.py",
        "tests/test_app.py",
    }
    project = tomllib.loads(files["pyproject.toml"])
    assert project["project"]["name"] == "myapp"
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "myapp.server_app:app", "clientapp": "myapp.client_app:app"}
    for ref in components.values():  # each names a module-level `app` of a generated file
        module, attr = ref.split(":")
        tree = trees[module.replace(".", "/") + ".py"]
        assigned = [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets]
        assert attr in assigned and isinstance(t := tree.body[0], ast.Expr), t
    assert "federations" not in project["tool"]["flwr"]  # flwr 1.42 would rewrite it
    home = tomllib.loads(files["flwr-home/config.toml"])["superlink"]
    local = home[home["default"]]
    assert local["address"] == ":local:" and local["options"]["num-supernodes"] == 3
    config = project["tool"]["flwr"]["app"]["config"]
    assert config["num-server-rounds"] == 2 and config["min-nodes"] == 3

    # The client mods in the documented order (protection outermost, clipping inside),
    # the server mods with noise outermost over the secure sum.
    client = [
        a.id
        for c in _call(trees["myapp/client_app.py"], "mods")
        for a in c.args
        if isinstance(a, ast.Name)
    ]
    want = [m for p, m in [("secagg", "secaggplus_mod"), ("he", "ckks_mod")] if p in pets]
    assert client == want + (["fixed_clipping_mod"] if "dp" in pets else [])
    build = next(
        n
        for n in trees["myapp/server_app.py"].body
        if isinstance(n, ast.FunctionDef) and n.name == "build"
    )
    (server_app,) = _call(build, "ServerApp")
    (listed,) = [k.value for k in server_app.keywords if k.arg == "mods"]
    assert isinstance(listed, ast.List)
    names = [
        e.func.id for e in listed.elts if isinstance(e, ast.Call) and isinstance(e.func, ast.Name)
    ]
    order = [("dp", "CentralDp"), ("secagg", "SecAggPlus"), ("he", "HomomorphicAggregation")]
    assert names == [m for p, m in order if p in pets]


def test_the_command_writes_the_app(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["new", "digitsapp", "--pets", "secagg,dp", "--directory", str(tmp_path / "a")]) == 0
    )
    written = {
        str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*") if p.is_file()
    }
    assert written == set(render("digitsapp", ("dp", "secagg")))
    assert "dp, secagg" in capsys.readouterr().out
    # --force writes into a non-empty directory and leaves other files alone.
    (tmp_path / "a" / "notes.txt").write_text("mine")
    assert main(["new", "digitsapp", "--directory", str(tmp_path / "a"), "--force"]) == 0
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"
    assert "mods(" not in (tmp_path / "a" / "digitsapp" / "client_app.py").read_text()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["new", "My-App"], "not a valid app name"),
        (["new", "class"], "not a valid app name"),
        (["new", "json"], "not a valid app name"),  # would shadow the standard library
        (["new", "app", "--pets", "secagg,tee"], "unknown PET 'tee'"),
        (["new", "app", "--pets", "secagg,,dp"], "unknown PET"),
        (["new", "app", "--pets", "dp,dp"], "listed twice"),
        (["new", "app", "--pets", "secagg,he"], "choose one"),
        (["new", "app", "--pet", "dp"], "unrecognized arguments: --pet"),  # no abbreviation
        (["new", "app", "--directory", "{full}"], "is not empty (use --force"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str],
    says: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # were one accepted, ./app lands here
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        main([a.replace("{full}", str(full)) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    # argparse reports leftover arguments from the top-level parser
    prefix = "flowerpets: error: " if "unrecognized" in says else "flowerpets new: error: "
    assert err.count("\n") == 1 and err.startswith(prefix) and says in err, err
    assert (full / "keep.txt").read_text() == "x" and len(list(full.iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing written


def test_write_app_refuses_a_file_as_target(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        write_app(tmp_path / "f", "app", ())


@pytest.mark.parametrize("pets", [("dp", "secagg"), ("he",)], ids=lambda p: ",".join(p))
def test_the_generated_test_runs_the_app_in_process(
    pets: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "gen_" + "_".join(pets)
    write_app(tmp_path, name, pets)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location(f"{name}_test", tmp_path / "tests/test_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        module.test_two_rounds_on_three_nodes(monkeypatch)
        result = sys.modules[f"{name}.server_app"].app.last_result
        rounds = result.history.rounds
        if "dp" in pets:
            eps = [r.train_metrics["epsilon"] for r in rounds]
            assert 0 < eps[0] < eps[1]
        if "he" in pets:  # the server cannot read the model: only the nodes evaluate it
            assert all(r.server_metrics == {} for r in rounds)
            assert rounds[-1].evaluate_metrics["accuracy"] > 0.5
    finally:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


# ---- slow: flwr run ---------------------------------------------------------------------


def _run_flwr(app: Path, env: dict[str, str], history: Path, timeout: float, *args: str) -> None:
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), *args, "--stream",
         "--run-config", f"history-file='{history}'"],
        env=env, cwd=app, capture_output=True, timeout=timeout,
    )  # fmt: skip
    assert history.exists(), (run.stdout.decode()[-3000:], run.stderr.decode()[-3000:])


def _check(history: Path, pets: tuple[str, ...]) -> None:
    rounds = json.loads(history.read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["participants"] == 3 and r["error"] is None for r in rounds), rounds
    assert all(0.0 <= r["evaluate_metrics"]["accuracy"] <= 1.0 for r in rounds)
    if "dp" in pets:
        eps = [r["train_metrics"]["epsilon"] for r in rounds]
        assert 0 < eps[0] < eps[1]


def stop_by_argv(marker: str) -> None:
    """Stop, by PID, every process with ``marker`` in its argv and all their descendants."""
    psutil = link.psutil
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in p.info["cmdline"] or []):
            found[p.pid] = p
            with contextlib.suppress(psutil.NoSuchProcess):
                found.update({c.pid: c for c in p.children(recursive=True)})
    for p in found.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(list(found.values()), timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _, alive = psutil.wait_procs(alive, timeout=5)
    assert not alive, f"processes still running: {[p.pid for p in alive]}"


@pytest.mark.slow
@pytest.mark.parametrize("pets", [("dp", "secagg"), ("he",)], ids=lambda p: ",".join(p))
def test_flwr_run_in_simulation(pets: tuple[str, ...], tmp_path: Path) -> None:
    app = tmp_path / "app"
    write_app(app, "simapp", pets)
    # flwr starts its local simulation SuperLink itself, detached, on the ports these
    # variables name: free ones here, and it is found again by its FLWR_HOME in argv.
    home = app / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(link._free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(link._free_port()),
        "PYTHONPATH": os.pathsep.join(sys.path),
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
    }
    history = tmp_path / "history.json"
    try:
        _run_flwr(app, env, history, 300)
    finally:
        stop_by_argv(str(home))
    _check(history, pets)


@pytest.mark.slow
@pytest.mark.deployment
def test_flwr_run_through_the_superlink_fixture(superlink: SimpleNamespace) -> None:
    app = superlink.home / "app"
    write_app(app, "linkapp", ("dp", "secagg"))
    history = superlink.home / "history.json"
    remaining = superlink.deadline - time.monotonic()
    _run_flwr(app, superlink.env, history, max(remaining - 20, 10), "local")
    _check(history, ("dp", "secagg"))


@pytest.mark.parametrize("pets", COMBOS, ids=lambda p: ",".join(p) or "none")
def test_the_generated_app_is_clean_under_its_own_ruff_config(
    pets: tuple[str, ...], tmp_path: Path
) -> None:
    ruff = BIN / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed beside this Python")
    write_app(tmp_path, "lintapp", pets)
    for args in (["check", "--no-cache", "."], ["format", "--no-cache", "--check", "."]):
        run = subprocess.run([str(ruff), *args], cwd=tmp_path, capture_output=True, timeout=60)
        assert run.returncode == 0, run.stdout.decode() + run.stderr.decode()

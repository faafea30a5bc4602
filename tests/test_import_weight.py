"""A node imports only what its mods use (issue 11 item 4).

Under Flower's deployment runtime every message to a node starts a fresh
``flwr-clientapp`` process that imports the app, so what the client side
imports is paid per message. Each case imports a client-side face in a fresh
interpreter and asserts which heavy modules it left out of ``sys.modules``: a
property of the import graph, not a time.

``grpc`` (and ``cryptography``) come with ``flwr`` itself (``import flwr`` loads
them), so only the faces that do not touch flwr are held to leave grpc out.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HEAVY = (
    "dp_accounting", "grpc", "matplotlib", "opacus", "psutil",
    "scipy", "sklearn", "tenseal", "torch",
)  # fmt: skip
NOT_FLWRS = tuple(m for m in HEAVY if m != "grpc")  # what flwr does not bring itself
SERVER_SIDE = (
    "flowerpets.dp.central",
    "flowerpets.flower.deployment",
    "flowerpets.flower.grid",
    "flowerpets.flower.server",
    "flowerpets.he.server",
    "flowerpets.secagg.server",
    "flowerpets.simulation",
    "flowerpets.transport.server",
)

# (statement, modules it must leave out of sys.modules)
CASES = {
    "flowerpets": ("import flowerpets", (*HEAVY, "flwr")),
    "flower-face": ("import flowerpets.flower", (*HEAVY, "flwr", "flowerpets.flower.client")),
    "secagg": ("from flowerpets.secagg import secaggplus_mod", (*HEAVY, *SERVER_SIDE)),
    "dp": ("from flowerpets.dp import LocalDpMod, fixed_clipping_mod", (*HEAVY, *SERVER_SIDE)),
    "he": ("from flowerpets.he import ckks_mod", (*HEAVY, *SERVER_SIDE)),
    "digits": ("import flowerpets.examples.digits", (*HEAVY, "flowerpets.secagg")),
    "flower-client": (
        "from flowerpets.dp import fixed_clipping_mod\n"
        "from flowerpets.flower import ClientApp, mods\n"
        "from flowerpets.he import ckks_mod\n"
        "from flowerpets.secagg import secaggplus_mod\n"
        "app = ClientApp(mods=[mods(secaggplus_mod, fixed_clipping_mod)])\n"
        "ClientApp(mods=[mods(ckks_mod)])",
        (*NOT_FLWRS, *SERVER_SIDE),
    ),
}
NEEDS = {"flower-client": "flwr", "digits": "sklearn"}


def _loaded_after(code: str, names: tuple[str, ...], path: str = "") -> list[str]:
    """Which of ``names`` a fresh interpreter has in ``sys.modules`` after running ``code``."""
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps([m for m in {names!r} if m in sys.modules]))"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return loaded


@pytest.mark.parametrize("case", CASES)
def test_a_client_side_face_leaves_heavy_modules_out(case: str) -> None:
    if case in NEEDS:
        pytest.importorskip(NEEDS[case])
    code, left_out = CASES[case]
    assert _loaded_after(code, left_out) == []


def test_the_faces_still_load_what_they_name_on_use() -> None:
    """The lazy faces are not empty: using a name imports its home (here, tenseal for CKKS)."""
    pytest.importorskip("tenseal")
    code = "import flowerpets.he as he\nhe.COMPACT\nfrom flowerpets.he._primitives import params\n"
    code += "params.new_secret_context(he.COMPACT)"
    assert _loaded_after(code, ("tenseal", "flowerpets.he._primitives.params")) == [
        "tenseal",
        "flowerpets.he._primitives.params",
    ]


@pytest.mark.parametrize("pets", ["secagg,dp", "he"])
def test_a_generated_flower_apps_client_leaves_heavy_modules_out(pets: str, tmp_path: Path) -> None:
    """``flowerpets new``'s ClientApp, as ``flwr-clientapp`` loads it per message."""
    pytest.importorskip("flwr")
    from flowerpets.new import write_app

    write_app(tmp_path / "app", "weighed", tuple(pets.split(",")))
    loaded = _loaded_after(
        "import weighed.client_app", (*NOT_FLWRS, *SERVER_SIDE), str(tmp_path / "app")
    )
    assert loaded == []


LAZY_FACES = ["flowerpets.dp", "flowerpets.flower", "flowerpets.he", "flowerpets.secagg"]


@pytest.mark.parametrize("name", LAZY_FACES)
def test_a_lazy_face_knows_a_home_for_every_name_it_exports(name: str) -> None:
    if name == "flowerpets.flower":
        pytest.importorskip("flwr")
    face = importlib.import_module(name)
    homes = face._HOMES
    assert sorted(homes) == face.__all__
    for exported, home in homes.items():
        module = importlib.import_module(f"{name}.{home}")
        want = module if home == exported else getattr(module, exported)
        assert getattr(face, exported) is want, exported
    assert set(face.__all__) <= set(dir(face))
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        face.nonexistent  # noqa: B018

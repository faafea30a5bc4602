"""Every PET names its stages, config keys and records under its one namespace."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

import flowerpets.dp._protocol as dp_protocol
import flowerpets.he.protocol as he_protocol
import flowerpets.secagg.protocol as secagg_protocol
from flowerpets.core.protocol import StageName, check_stage_names
from flowerpets.dp import central, distributed, dpsgd, local

PETS: dict[str, ModuleType] = {"secagg+": secagg_protocol, "he": he_protocol, "dp": dp_protocol}


def _stage_classes(module: ModuleType) -> list[type[StageName]]:
    return [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, StageName)]


def test_every_stage_class_lives_in_a_pet_protocol_module() -> None:
    declared = {cls for module in PETS.values() for cls in _stage_classes(module)}
    declared.discard(StageName)
    in_src = {c for c in StageName.__subclasses__() if c.__module__.startswith("flowerpets.")}
    assert in_src == declared
    assert {secagg_protocol.Stage, he_protocol.Stage} <= declared


@pytest.mark.parametrize("namespace", sorted(PETS))
def test_stage_names_follow_the_convention(namespace: str) -> None:
    for cls in _stage_classes(PETS[namespace]):
        if cls is StageName:
            continue
        assert cls.namespace() == namespace
        assert all(stage.startswith(cls.prefix()) for stage in cls)


def test_secagg_stage_keeps_its_wire_names() -> None:
    assert tuple(secagg_protocol.Stage) == secagg_protocol.Stage.ALL
    assert secagg_protocol.Stage.prefix() == secagg_protocol.Stage.PREFIX


def test_config_keys_and_records_are_under_the_namespace() -> None:
    he_keys = [v for k, v in vars(he_protocol).items() if k.startswith("CONFIG_")]
    assert len(he_keys) == 4
    dp_keys = [
        dp_protocol.CLIP_KEY,
        dp_protocol.REPLY_MODEL_KEY,
        dp_protocol.INDICATOR,
        dp_protocol.ENCODING_KEY,
        dp_protocol.RESIDUES,
        dp_protocol.CLIPPED,
    ]
    for prefix, keys in (("he.", he_keys), ("dp.", dp_keys)):
        assert all(isinstance(k, str) and k.startswith(prefix) for k in keys), keys
    for key in (central.STATE_KEY, distributed.STATE_KEY, dpsgd.STATE_KEY, local.STATE_KEY):
        assert key.startswith("dp.")
    for record in (secagg_protocol.RECORD, secagg_protocol.MASKED_RECORD):
        assert record == "secagg+" or record.startswith("secagg+/")


@pytest.mark.parametrize(
    "stages",
    [
        ["he-advertise"],  # no namespace
        ["he/Keygen"],  # not kebab-case
        ["he/keygen", "dp/clip"],  # two namespaces
        ["HE/keygen"],
        ["he/"],
        [],
    ],
)
def test_check_refuses_names_off_the_convention(stages: list[str]) -> None:
    with pytest.raises(ValueError):
        check_stage_names(stages)


def test_a_stage_class_off_the_convention_is_caught() -> None:
    bad = StageName("Bad", {"ONE": "x/one", "TWO": "y/two"})  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="one namespace"):
        bad.namespace()


@pytest.mark.parametrize("server", ["flowerpets.secagg.server", "flowerpets.he.server"])
def test_servers_do_not_import_their_clients(server: str) -> None:
    spec = importlib.util.find_spec(server)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    client = server.rsplit(".", 1)[0] + ".client"
    assert client not in imported
    assert not any(
        alias.name.startswith("_")
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("flowerpets.")
        for alias in n.names
    ), "a server takes only public names from other modules"

"""The README's demo commands parse and resolve (running them is the demo tests' job)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from flowerpets.cli import build_parser
from flowerpets.examples.digits import demo

README = Path(__file__).resolve().parents[2] / "README.md"


def _demo_commands() -> list[list[str]]:
    commands = []
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("python3 tasks.py demo"):
            argv = shlex.split(line, comments=True)[3:]
            if "--help" not in argv:
                commands.append(argv)
    return commands


COMMANDS = _demo_commands()


def test_the_readme_shows_the_default_and_plain_runs() -> None:
    assert [] in COMMANDS and ["--pets", "none"] in COMMANDS


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a) or "(defaults)" for a in COMMANDS])
def test_a_readme_command_parses_and_resolves(argv: list[str]) -> None:
    args = demo.resolve(build_parser().parse_args(["demo", *argv]))
    assert args.composition in {demo.RECOMMENDED, demo.NONE, "custom"}


def _console_commands() -> list[list[str]]:
    """The ``$ flowerpets ...`` lines of the README's console blocks (a run killed, resumed)."""
    return [
        shlex.split(line.removeprefix("$ flowerpets "))
        for line in README.read_text(encoding="utf-8").splitlines()
        if line.startswith("$ flowerpets ")
    ]


def test_the_readme_kills_a_stored_demo_and_resumes_it() -> None:
    from flowerpets.examples.digits.stored import check_storable

    commands = _console_commands()
    demo_runs = [argv for argv in commands if argv[0] == "demo" and "--store" in argv]
    resumes = [argv for argv in commands if argv[0] == "resume"]
    assert demo_runs and resumes, "the README no longer shows a run killed and resumed"
    for argv in demo_runs:
        args = demo.resolve(build_parser().parse_args(argv))
        check_storable(args)  # the composition it stores is one a store can resume
    for argv in resumes:
        args = build_parser().parse_args(argv)
        stored = demo_runs[0][demo_runs[0].index("--store") + 1]
        assert args.store == stored  # it resumes the store the killed run wrote

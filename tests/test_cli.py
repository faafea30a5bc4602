"""The ``flowerpets`` command line: one-line errors, exit status 2, no abbreviations, plain help.

Every bad command line a new user tried (issue 9, item 13) must end in one line
on stderr, ``prog: error: ...``, and exit status 2: never a traceback, never a
silently ignored flag, never an abbreviation taken for a longer option.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from flowerpets.cli import build_parser, main, parsers


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``flowerpets *argv``; check exit status 2 and one line on stderr; return that line."""
    capsys.readouterr()
    code = _exit_code(list(argv))
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(r"^flowerpets( \w+)*: error: ", lines[0]), lines[0]
    return lines[0]


@pytest.fixture
def demo_available() -> None:
    pytest.importorskip("sklearn")


# -- item 13: the commands that raised tracebacks or were silently ignored -------------------------
@pytest.mark.usefixtures("demo_available")
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--cohort-size", "50"], "--cohort-size 50 exceeds the number of clients"),
        (["--he", "--he-encrypt", "nomatch"], "--he-encrypt nomatch matches none"),
        (
            ["--dp", "central", "--clip-on", "server", "--secagg", "--noise-multiplier", "1"],
            "--clip-on server needs every update one by one",
        ),
        (["--adaptive-clip", "--noise-multiplier", "2.5"], "--adaptive-clip cannot keep"),
        (["--pets", "none", "--noise-multiplier", "1"], "--noise-multiplier needs --dp central"),
        (["--pets", "none", "--adaptive-clip"], "--adaptive-clip needs --dp central"),
        (
            ["--pets", "none", "--clip", "2"],
            "--clip needs --dp central, --dp distributed or --dp local",
        ),
        (["--pets", "none", "--secagg-k", "4"], "--secagg-k needs --secagg"),
        (["--pets", "none", "--he-params", "wide"], "--he-params needs --he"),
        (["--dp", "local", "--target-epsilon", "3", "--clip-on", "server"], "drop --clip-on"),
        (
            ["--dp", "central", "--noise-multiplier", "1", "--target-quantile", "0.3"],
            "--target-quantile needs --adaptive-clip",
        ),
        (
            ["--dp", "central", "--noise-multiplier", "1", "--max-epsilon", "1"],
            "--max-epsilon 1 is below the epsilon of a single round",
        ),
        (
            ["--dp", "local", "--target-epsilon", "8", "--max-epsilon", "4"],
            "--max-epsilon 4 is below one round's epsilon",
        ),
        (["--pets", "recommended", "--he"], "give one or the other"),
        (["--pets", "none", "--secagg"], "give one or the other"),
        (["--sample-rate", "2"], "must be in (0, 1]"),
        (["--round", "2"], "unrecognized arguments: --round 2"),
        (["--noise-mult", "1"], "unrecognized arguments: --noise-mult 1"),
    ],
)
def test_bad_demo_flags_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    assert says in one_line_error(capsys, "demo", *argv)


def test_bad_accountant_flags_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    plan = ["accountant", "plan", "--population", "100", "--clients-per-round", "10"]
    plan += ["--rounds", "5", "--noise-multiplier", "1", "--delta", "1e-5"]
    assert "--plot eps.txt: the file name must end in one of" in one_line_error(
        capsys, *plan, "--plot", "eps.txt"
    )
    assert "got no extension" in one_line_error(capsys, *plan, "--plot", "eps")
    line = one_line_error(capsys, *plan[:-2], "--del", "1e-5")  # an abbreviation of --delta
    assert "--delta" in line


DELTA = ("--delta", "1e-5")


@pytest.mark.parametrize(
    "argv",
    [
        ["no-such-command"],
        ["server", "--ap", "x:y"],  # an abbreviation of --app
        ["certs", "--ou", "creds"],  # an abbreviation of --out
        [
            "accountant",
            "epsilon",
            "--noise",
            "1",
            *("--sample-rate", "0.1", "--steps", "3"),
            *DELTA,
        ],
    ],
)
def test_other_subcommands_refuse_abbreviations_in_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    one_line_error(capsys, *argv)


def _all_parsers() -> Iterator[argparse.ArgumentParser]:
    yield from parsers(build_parser())


def test_no_parser_accepts_abbreviations() -> None:
    every = list(_all_parsers())
    names = {p.prog for p in every}
    assert {"flowerpets", "flowerpets demo", "flowerpets accountant plan"} <= names
    assert all(p.allow_abbrev is False for p in every), [p.prog for p in every if p.allow_abbrev]


def test_help_texts_are_plain_text() -> None:
    # reStructuredText belongs in docstrings; --help shows text as it is.
    for parser in _all_parsers():
        text = parser.format_help()
        assert "``" not in text and ":class:" not in text and ":func:" not in text, parser.prog


@pytest.mark.usefixtures("demo_available")
def test_typed_errors_from_the_run_are_one_line_and_bugs_keep_their_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowerpets.examples.digits import demo
    from flowerpets.exceptions import IncompatibleModsError

    def refused(*args: object, **kwargs: object) -> None:
        raise IncompatibleModsError("these mods do not go together\n(second line)")

    monkeypatch.setattr(demo, "run_simulation", refused)
    line = one_line_error(capsys, "demo", "--pets", "none", "--rounds", "1")
    assert line == "flowerpets demo: error: these mods do not go together; (second line)"

    def bug(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(demo, "run_simulation", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["demo", "--pets", "none", "--rounds", "1"])


def test_one_line_parser(capsys: pytest.CaptureFixture[str]) -> None:
    from flowerpets._argtypes import OneLineParser, one_line

    parser = OneLineParser(prog="tool")
    child = parser.add_subparsers(dest="command").add_parser("go")
    assert isinstance(child, OneLineParser) and child.allow_abbrev is False
    child.add_argument("--rounds", type=int, default=1)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["go", "--round", "2"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "tool: error: unrecognized arguments: --round 2"
    ]
    assert one_line("first\n\n  second  \n") == "first; second"

"""The command line's own answers: a bad option or command is one line and exit 2."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "argv, says",
    [
        (["predict", "x.jpg", "--photo-workers", "fork"], "invalid choice: 'fork'"),
        (["evaluate", "--split", "bogus"], "invalid choice: 'bogus'"),
        (["predict"], "required: PATH"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["predict", "x.jpg", "--batch-size", "many"], "invalid int value"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(argv, says, capsys):
    from faceattrs.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err, err


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_exception_is_one_internal_error_line_and_exit_1(
    monkeypatch, capsys, tmp_path, debug
):
    """A bug (an exception that is no FaceattrsError, OSError or Ctrl-C) is reported as
    one line and exit 1, not as bad input (2); --debug adds the traceback before it."""
    from faceattrs.cli import main
    from faceattrs.cli import report as report_cli

    def broken(args):
        raise RuntimeError("planted failure\nsecond line of the message")

    monkeypatch.setattr(report_cli, "run", broken)
    monkeypatch.delenv("FACEATTRS_DEBUG", raising=False)
    argv = ["report", "--run", str(tmp_path)]
    assert main(["--debug", *argv] if debug else argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1] == (
        "faceattrs report: internal error: RuntimeError: planted failure "
        "(a bug: please report it; --debug shows the traceback)"
    )
    if debug:
        assert lines[0] == "Traceback (most recent call last):"
        assert any("in broken" in line for line in lines)  # the frame that raised
        # the whole message is in the traceback; the last line keeps its first line only
        assert lines[-3:-1] == ["RuntimeError: planted failure", "second line of the message"]
    else:
        assert len(lines) == 1, lines


def test_help_of_the_commands_that_use_the_bundled_model_gives_its_terms(capsys):
    """The bundled model is for non-commercial research only (its training faces are):
    every command that uses it without --model says so in its help, and the others don't."""
    from faceattrs.cli import COMMANDS, DEFAULT_MODEL_COMMANDS, main

    def help_of(argv):
        with pytest.raises(SystemExit):
            main(argv)
        # argparse wraps lines, also after a hyphen
        return " ".join(capsys.readouterr().out.split()).replace("non- ", "non-")

    assert "non-commercial research only" in help_of(["--help"])
    for name, _, _ in COMMANDS:
        says = "non-commercial research only" in help_of([name, "--help"])
        assert says == (name in DEFAULT_MODEL_COMMANDS), name
    # and those commands really take --model as optional (the note would be wrong else)
    for name in DEFAULT_MODEL_COMMANDS:
        assert "--model" in help_of([name, "--help"]), name


def parsers():
    """``(name, parser)`` of faceattrs and of each command."""
    import argparse

    from faceattrs.cli import build_parser

    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return [("faceattrs", top), *sub.choices.items()]


def help_lines(argv, capsys, monkeypatch) -> list[str]:
    from faceattrs.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out.splitlines()


def test_every_option_shows_its_default():
    """Each option with a default says it in its help (``serve --queue`` did not); a flag
    that is off or an option without a value has none. prepare's options, whose defaults
    are PrepareConfig's, name those."""
    import argparse

    from faceattrs.prepare import PrepareConfig

    def shown(parser, action) -> str:
        fmt = parser.formatter_class(parser.prog)
        fmt.add_argument(action)
        return " ".join(fmt.format_help().split())

    checked = 0
    for name, parser in parsers():
        for action in parser._actions:
            d = action.default
            if not action.option_strings or d is None or d is False or d == [] or (
                d is argparse.SUPPRESS
            ):  # fmt: skip
                continue
            text = shown(parser, action)
            values = {str(d)} | ({f"{d:,}", f"{d:g}"} if isinstance(d, int | float) else set())
            assert "default" in text and any(v in text for v in values), (name, text)
            checked += 1
    assert checked >= 20
    prepare = dict(parsers())["prepare"]
    for action in prepare._actions:
        field = action.dest
        if hasattr(PrepareConfig(), field):
            assert f"default {getattr(PrepareConfig(), field)}" in shown(prepare, action), field


def test_top_level_help_is_for_users(capsys, monkeypatch):
    """One line of what the tool does, one line per command, examples as examples, and
    nothing about the code."""
    from faceattrs.cli import COMMANDS, DESCRIPTION, EXAMPLES

    lines = help_lines([], capsys, monkeypatch)
    text = "\n".join(lines)
    for dev in ("cli/", ".py", "``", "lives in", "module"):
        assert dev not in text, dev
    first = lines.index("") + 1  # after the usage
    assert lines[first] == DESCRIPTION and lines[first + 1] == ""
    for name, _, help_ in COMMANDS:
        line = next(x for x in lines if x.startswith(f"    {name} "))
        assert line.split(None, 1)[1] == help_, line  # whole, on its own line
    for example in EXAMPLES.splitlines():
        assert example in lines, example


def test_examples_keep_their_line_breaks(capsys, monkeypatch):
    """Each command's examples stay one per line, apart from the prose around them."""
    import inspect

    from faceattrs.cli import COMMANDS

    for name, _, _ in COMMANDS:
        doc = inspect.getmodule(dict(parsers())[name]._defaults["_run"]).__doc__
        examples = [
            line.strip()
            for line in doc.splitlines()
            if line.strip().startswith(("faceattrs ", "torchrun "))
        ]
        assert examples, name  # each command shows how it runs
        lines = [line.strip() for line in help_lines([name], capsys, monkeypatch)]
        for example in examples:
            assert example.replace("``", "") in lines, (name, example)
    serve = help_lines(["serve"], capsys, monkeypatch)
    assert not any("runs/cpu" in line and "Binds" in line for line in serve)

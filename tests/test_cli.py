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

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

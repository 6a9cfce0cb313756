"""Command line: ``faceattrs COMMAND ...``. Each command lives in ``cli/COMMAND.py``.

A command module only parses arguments (``add_arguments(parser)``) and calls stage
functions (``run(args) -> exit status``); the work itself lives in the stage modules.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shutil
import signal
import sys
import textwrap
import traceback

from .. import __version__
from ..exceptions import FaceattrsError

# (command, module, one-line help: it must fit one line of `faceattrs --help` on 80
# columns, tests/test_cli.py); listed in pipeline order.
COMMANDS = [
    ("prepare", "prepare", "validate, de-duplicate and split a face CSV or photo folder"),
    ("train", "train", "train the multitask (gender + ethnicity) model"),
    ("evaluate", "evaluate", "metrics and figures of a trained model on a split or a file"),
    ("ensemble", "ensemble", "join trained runs of one design into one model"),
    ("calibrate", "calibrate", "fit temperature scaling on the validation split"),
    ("explain", "explain", "Grad-CAM overlays for a photo or misclassified test faces"),
    ("errors", "errors", "cluster the misclassified test faces"),
    ("train-age", "train_age", "train the age model on top of a multitask model"),
    ("predict", "predict", "faces in photos -> gender, ethnicity, age"),
    ("export", "export", "export the models to ONNX"),
    ("serve", "serve", "web page and HTTP API: drop in photos, see the estimates"),
    ("report", "report", "write the run's self-contained report.html"),
    ("run", "run", "every stage in order, ending with the report"),
]


# what `faceattrs --help` says: for users (the module docstring above is for developers)
DESCRIPTION = "Gender, ethnicity and age from face images, and how well and how fairly it does."
EXAMPLES = """\
examples:
  faceattrs predict photo.jpg                    one record per face, as JSON lines
  faceattrs predict photos/ --out results.csv    every photo of a folder, into a CSV file
  faceattrs serve                                a web page at http://127.0.0.1:8000/
  faceattrs run --data faces.csv.gz --out runs/mine --preset cpu
                                                 train, evaluate and report your own model
  faceattrs COMMAND --help                       a command's options and examples"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help for users: descriptions and epilogs as written (examples keep their lines),
    and every option's default shown: ``(default X)`` is added to a help that does not
    already say it (a flag that is off, or an option without a value, has none)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
            or isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            return text
        return f"{text} (default %(default)s)"


def user_text(doc: str) -> str:
    """A command module's docstring as its help: without reStructuredText's ``quotes``."""
    return doc.strip("\n").replace("``", "")


def wrapped(text: str) -> str:
    """Prose for a raw epilog, wrapped as argparse would (it wraps nothing there)."""
    width = shutil.get_terminal_size().columns - 2  # as argparse measures it
    return textwrap.fill(text, max(40, min(width, 100)), break_on_hyphens=False)


# the commands that run under torchrun (several processes, one writer); any other command
# would run once per process, each writing the same files
DISTRIBUTED = ("train",)


class CLIError(FaceattrsError):
    """An error to print as one line, with exit status 2."""


DEBUG_HELP = "show the traceback of an error (also FACEATTRS_DEBUG=1)"
# the commands that use the model bundled in the package when no --model is given
DEFAULT_MODEL_COMMANDS = ("evaluate", "explain", "errors", "predict", "export", "serve")
DEFAULT_MODEL_NOTE = (
    "Without --model, the default model bundled in the package is used (docs/MODEL_CARD.md): "
    "it was trained on UTKFace faces, which are for non-commercial research only, and so is "
    "the model."
)


class OneLineParser(argparse.ArgumentParser):
    """argparse with a bad option answered in one line (not the usage block), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    note = f"{DEFAULT_MODEL_NOTE} Commands that use it: {', '.join(DEFAULT_MODEL_COMMANDS)}."
    parser = OneLineParser(
        prog="faceattrs",
        description=DESCRIPTION,
        epilog=f"{EXAMPLES}\n\n{wrapped(note)}",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"faceattrs {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # --debug also after the command (SUPPRESS: an absent one keeps the value given before)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for name, module, help_ in COMMANDS:
        mod = importlib.import_module(f"{__name__}.{module}")
        epilog = wrapped(DEFAULT_MODEL_NOTE) if name in DEFAULT_MODEL_COMMANDS else None
        p = sub.add_parser(
            name,
            help=help_,
            description=user_text(mod.__doc__),
            epilog=epilog,
            parents=[common],
            formatter_class=HelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every temporary file is removed on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    try:  # only the main thread may set a handler
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:
        previous = None
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)  # under torchrun: this process's rank
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(  # one log: other ranks say only what goes wrong, marked
        level=level if rank == 0 else logging.WARNING,
        format="%(message)s" if rank == 0 else f"[rank {rank}] %(message)s",
    )
    debug = args.debug or os.environ.get("FACEATTRS_DEBUG", "") not in ("", "0")
    try:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and args.command not in DISTRIBUTED:
            raise CLIError(
                f"under torchrun only {', '.join(DISTRIBUTED)} runs on several processes; "
                f"run `faceattrs {args.command}` in one (docs/training.md)"
            )
        guard = contextlib.nullcontext
        if hasattr(args, "max_pixels"):  # a command that decodes photos: its --max-pixels
            from ..photo.decode import pillow_limit_lifted as guard  # is the limit, not Pillow's

        with guard():
            return int(args._run(args) or 0)
    except FaceattrsError as e:
        if debug:
            traceback.print_exc()
        print(f"faceattrs {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 143 if terminated else 130
    except OSError as e:  # the machine, not the input: a full disk, a permission, a lost mount
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print(f"faceattrs {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not the input: one line, the traceback on request
        if debug:
            traceback.print_exc()
        what = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"faceattrs {args.command}: internal error: {type(e).__name__}: {what} "
            "(a bug: please report it; --debug shows the traceback)",
            file=sys.stderr,
        )
        return 1

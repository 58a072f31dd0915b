"""``python -m benchmark <command>``. Each command lives in ``benchmark/commands/<name>.py`` and exposes
``register(subparsers)`` (adds its parser, with ``func`` set to a callable taking the parsed args and returning
an exit code).

Global options, accepted before the command or after it on every command: ``--plugin MODULE|FILE.py``
(repeatable; registers extra methods), ``--registry FILE.toml`` (repeatable; extra cohorts and backbones) and
``--debug`` (show the traceback of an expected failure instead of its one-line message).

Expected failures (bad input: unknown names, missing or unreadable files, permissions, bad option values,
plugins that do not import) print one line ``error: <option or file>: <problem>`` and exit with code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: command modules, in the order ``--help`` lists them
COMMANDS = ("list", "synth", "audit", "splits", "run", "tune", "table", "plot", "compare", "calibration", "report", "bench")
#: exit code of an expected failure (the same as argparse's usage errors)
USAGE_ERROR = 2


def _add_global_options(parser: argparse.ArgumentParser, prefix: str, default) -> None:
    """The global options; ``prefix`` separates the values given after the command from those before it."""
    group = parser.add_argument_group("global options (before or after the command)")
    group.add_argument("--plugin", action="append", dest=f"{prefix}plugin", default=default([]),
                       metavar="MODULE|FILE.py", help="import a module or .py file first (it registers extra "
                                                      "methods); repeatable")
    group.add_argument("--registry", action="append", dest=f"{prefix}registry", default=default([]),
                       metavar="FILE.toml", help="declare extra cohorts / backbones ([cohorts.<name>], "
                                                 "[backbones.<name>] tables); repeatable; also $MIL_BENCHMARK_REGISTRY")
    group.add_argument("--debug", action="store_true", dest=f"{prefix}debug", default=default(False),
                       help="show the traceback of an expected failure")


def _leaf_parsers(parser: argparse.ArgumentParser):
    """The parsers that end a command line (commands, and sub-commands such as ``plot km``)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
        return
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            yield from _leaf_parsers(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark",
        description="MIL survival benchmark: train, evaluate and compare multiple-instance-learning survival methods "
                    "on whole-slide-image features (every method shares one loss, one feature loader and one set of "
                    "fold splits).")
    _add_global_options(parser, "", lambda value: value)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"benchmark.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmark.commands.{name}":
                raise
            continue  # command not built yet
        module.register(sub)
    for leaf in _leaf_parsers(parser):
        if leaf is not parser:  # after the command: stored apart, so they add to (not replace) the ones before
            _add_global_options(leaf, "command_", lambda value: argparse.SUPPRESS)
    return parser


def _merge_global_options(args: argparse.Namespace) -> argparse.Namespace:
    args.plugin = list(args.plugin) + list(getattr(args, "command_plugin", []))
    args.registry = list(args.registry) + list(getattr(args, "command_registry", []))
    args.debug = bool(args.debug or getattr(args, "command_debug", False))
    return args


def apply_global_options(args: argparse.Namespace) -> None:
    """Read the ``--registry`` files and import the ``--plugin`` modules (before the command runs)."""
    from benchmark.data.cohorts import add_registry_file
    from benchmark.api.registry import load_plugins

    for path in args.registry:
        add_registry_file(path)
    load_plugins(args.plugin)


def is_expected_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is bad input (one-line message) rather than a bug (traceback)."""
    from benchmark.naming import UnknownNameError
    from benchmark.api.registry import PluginError

    if isinstance(exc, (UnknownNameError, PluginError, ValueError, OSError)):
        return True
    # the harness raises KeyError with a sentence ("unknown sample ..."); a bare key is a bug
    return isinstance(exc, KeyError) and bool(exc.args) and isinstance(exc.args[0], str) and " " in exc.args[0]


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; an operating-system error as ``<file>: <problem>``."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" + (f" ({exc.filename2})" if exc.filename2 else "")
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join(lines) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _merge_global_options(parser.parse_args(argv))
    try:
        apply_global_options(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not is_expected_failure(exc):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    raise SystemExit(main())

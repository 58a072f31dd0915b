"""``python -m benchmark <command>``. Each command lives in ``benchmark/commands/<name>.py`` and exposes
``register(subparsers)`` (adds its parser, with ``func`` set to a callable taking the parsed args and returning
an exit code)."""
from __future__ import annotations

import argparse
import importlib
import sys

#: command modules, in the order ``--help`` lists them
COMMANDS = ("list", "synth", "audit", "run", "tune", "table", "plot", "compare", "report", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark",
        description="MIL survival benchmark: train, evaluate and compare multiple-instance-learning survival methods "
                    "on whole-slide-image features (every method shares one loss, one feature loader and one set of "
                    "fold splits).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"benchmark.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmark.commands.{name}":
                raise
            continue  # command not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        # Bad input: a clear one-line message, not a traceback.
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

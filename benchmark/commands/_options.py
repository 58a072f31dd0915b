"""The grid options ``run`` and ``tune`` share, built from the settings table (``benchmark.settings.options``)."""
from __future__ import annotations

import argparse

from benchmark.settings.options import SETTINGS, add_arguments


def add_grid_arguments(p: argparse.ArgumentParser) -> None:
    """What the cells are, where the data are, how cells are trained and where they run."""
    from benchmark.execution.executors import EXECUTORS

    p.add_argument("--config", default=None, metavar="FILE",
                   help="experiment file (TOML): every key and its meaning in docs/SETTINGS.md; options given "
                        "here override it")
    add_arguments(p, SETTINGS, ("grid", "data", "training"))
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override recipe fields, e.g. --set lr=3e-4 epochs=4 (repeatable)")
    p.add_argument("--method-option", action="extend", nargs="+", default=[], metavar="[METHOD.]KEY=VALUE",
                   dest="method_options", help="constructor options, for every selected method or one "
                                               "(amil.dropout=0.1); repeatable")
    add_arguments(p, SETTINGS, ("execution",), choices_of={"executor": EXECUTORS.names()})
    p.add_argument("--no-weights", action="store_true", help="same as --save-weights none")
    p.add_argument("--strict", action="store_true", help="exit with code 1 when any cell failed")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells to run and to skip with an estimated time per method; train nothing")

"""``python -m benchmark list [datasets|backbones|methods|executors|tests|settings]``: print the registries and the
settings reference.

Tables fit the terminal: names are never cut; on a narrow terminal (under 120 columns) the long text columns
(a backbone's description, a method's source) are printed under the table, one entry per paragraph.
"""
from __future__ import annotations

import argparse

#: Terminal width from which descriptions and sources stay inside the tables.
WIDE = 120


def register(subparsers) -> None:
    p = subparsers.add_parser("list", help="list datasets, backbones, methods, executors and settings")
    p.add_argument("what", nargs="?", default="all",
                   choices=("all", "datasets", "backbones", "methods", "executors", "tests", "settings"))
    p.add_argument("--markdown", action="store_true",
                   help="with settings: print the reference of every experiment-file key (docs/SETTINGS.md)")
    p.set_defaults(func=run)


def _extension_points(console, what: str) -> None:
    """The executors and the settings reference."""
    from rich.table import Table

    if what in ("all", "executors"):
        from benchmark.execution.executors import EXECUTORS

        t = Table(title="executors (--executor)")
        for c in ("name", "description"):
            t.add_column(c)
        for name, kind in EXECUTORS.items():
            t.add_row(name, kind.description)
        console.print(t)
    if what in ("all", "tests"):
        from benchmark.analysis.significance import STAT_TESTS

        t = Table(title="statistical tests (table --significance --test, compare --test)")
        for c in ("name", "description", "conditions on"):
            t.add_column(c, overflow="fold")
        for name, test in STAT_TESTS.items():
            t.add_row(name, test.description, test.conditions_on)
        console.print(t)
    if what == "settings":
        from benchmark.settings.options import SETTINGS, TUNE_SETTINGS

        t = Table(title="settings (experiment-file key, option; docs/SETTINGS.md)")
        for c in ("key", "option", "default"):
            t.add_column(c)
        for s in [*SETTINGS.values(), *TUNE_SETTINGS.values()]:
            t.add_row(s.key if s.section != "tune" else f"tune.{s.key}", s.flag if s.cli else "(file only)",
                      "" if s.default in (None, [], {}) else str(s.default))
        console.print(t)


def _table(title: str, columns: tuple[str, ...], whole: tuple[str, ...] = ()):
    """A table whose first column (and the ``whole`` ones) is never wrapped; no cell is cut with an ellipsis."""
    from rich.table import Table

    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, no_wrap=i == 0 or c in whole, overflow="fold")
    return t


def _print_notes(console, notes: list[tuple[str, str]]) -> None:
    """``name: text`` paragraphs under a table (long text on a narrow terminal)."""
    for name, text in notes:
        console.print(f"[bold]{name}[/bold]: {text}", overflow="fold")
    if notes:
        console.print()


def _datasets(console) -> None:
    from benchmark.data.cohorts import cohort_names, get_cohort

    t = _table("datasets (facts of the real label tables; times in months)",
               ("name", "projects", "patients", "slides", "events", "cens.", "median t", "max t"))
    for n in cohort_names():
        c = get_cohort(n)
        facts = [str(c.patients), str(c.slides), str(c.events), f"{c.censoring:.1%}", f"{c.time_median:g}",
                 f"{c.time_max:g}"]
        # a cohort declared by a user without table facts: dashes, not zeros
        t.add_row(n, " ".join(c.projects), *(facts if c.patients else ["-"] * len(facts)))
    console.print(t)


def _backbones(console) -> None:
    from benchmark.data.cohorts import backbone_names, get_backbone

    wide = console.width >= WIDE
    t = _table("backbones (noise, signal: of the synthetic features)",
               ("name", "dim", "variant of", "TRIDENT name", "noise", "signal") + (("description",) if wide else ()),
               whole=("TRIDENT name",))
    notes = []
    for n in backbone_names():
        b = get_backbone(n)
        t.add_row(n, str(b.dim), b.base if b.variant else "", b.trident or "", f"{b.synthetic_noise:g}",
                  f"{b.synthetic_signal:g}", *([b.description] if wide else []))
        notes.append((n, b.description))
    console.print(t)
    _print_notes(console, [] if wide else notes)


def _methods(console) -> None:
    from benchmark.api.registry import get_method_spec, method_names

    wide = console.width >= WIDE
    t = _table("methods", ("name", "needs", "loss", "in 'all'") + (("source",) if wide else ()))
    notes = []
    for n in method_names():
        s = get_method_spec(n)
        t.add_row(n, s.needs.describe(), s.loss, "yes" if s.in_all else "no", *([s.source] if wide else []))
        notes.append((n, s.source))
    if not method_names():
        t.add_row("(none registered yet)", "", "", "", *([""] if wide else []))
    console.print(t)
    _print_notes(console, [] if wide else notes)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.what == "settings" and args.markdown:
        from benchmark.settings.options import reference_markdown

        print(reference_markdown())
        return 0
    console = Console()
    _extension_points(console, args.what)
    if args.what in ("all", "datasets"):
        _datasets(console)
    if args.what in ("all", "backbones"):
        _backbones(console)
    if args.what in ("all", "methods"):
        _methods(console)
    return 0

"""``python -m benchmark list [datasets|backbones|methods]``: print the registries.

Tables fit the terminal: names are never cut; on a narrow terminal (under 120 columns) the long text columns
(a backbone's description, a method's source) are printed under the table, one entry per paragraph.
"""
from __future__ import annotations

import argparse

#: Terminal width from which descriptions and sources stay inside the tables.
WIDE = 120


def register(subparsers) -> None:
    p = subparsers.add_parser("list", help="list datasets, backbones and methods")
    p.add_argument("what", nargs="?", default="all", choices=("all", "datasets", "backbones", "methods"))
    p.set_defaults(func=run)


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
    from benchmark.data.backbones import backbone_names, get_backbone

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

    console = Console()
    if args.what in ("all", "datasets"):
        _datasets(console)
    if args.what in ("all", "backbones"):
        _backbones(console)
    if args.what in ("all", "methods"):
        _methods(console)
    return 0

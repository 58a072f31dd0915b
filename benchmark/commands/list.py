"""``python -m benchmark list [datasets|backbones|methods|executors|settings]``: print the registries and the
settings reference."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("list", help="list datasets, backbones, methods, executors and settings")
    p.add_argument("what", nargs="?", default="all",
                   choices=("all", "datasets", "backbones", "methods", "executors", "settings"))
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
    if what == "settings":
        from benchmark.settings.options import SETTINGS, TUNE_SETTINGS

        t = Table(title="settings (experiment-file key, option; docs/SETTINGS.md)")
        for c in ("key", "option", "default"):
            t.add_column(c)
        for s in [*SETTINGS.values(), *TUNE_SETTINGS.values()]:
            t.add_row(s.key if s.section != "tune" else f"tune.{s.key}", s.flag if s.cli else "(file only)",
                      "" if s.default in (None, [], {}) else str(s.default))
        console.print(t)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.what == "settings" and args.markdown:
        from benchmark.settings.options import reference_markdown

        print(reference_markdown())
        return 0
    console = Console()
    _extension_points(console, args.what)
    if args.what in ("all", "datasets"):
        from benchmark.data.cohorts import cohort_names, get_cohort

        t = Table(title="datasets (facts of the real label tables; times in months)")
        for c in ("name", "TCGA project(s)", "patients", "slides", "events", "censoring", "median time",
                  "max time"):
            t.add_column(c)
        for n in cohort_names():
            c = get_cohort(n)
            facts = [str(c.patients), str(c.slides), str(c.events), f"{c.censoring:.1%}", f"{c.time_median:g}",
                     f"{c.time_max:g}"]
            # a cohort declared by a user without table facts: dashes, not zeros
            t.add_row(n, ", ".join(c.projects), *(facts if c.patients else ["-"] * len(facts)))
        console.print(t)
    if args.what in ("all", "backbones"):
        from benchmark.data.backbones import backbone_names, get_backbone

        t = Table(title="backbones")
        for c in ("name", "dim", "variant of", "TRIDENT name", "synthetic noise", "synthetic signal", "description"):
            t.add_column(c)
        for n in backbone_names():
            b = get_backbone(n)
            t.add_row(n, str(b.dim), b.base if b.variant else "", b.trident or "", f"{b.synthetic_noise:g}",
                      f"{b.synthetic_signal:g}", b.description)
        console.print(t)
    if args.what in ("all", "methods"):
        from benchmark.api.registry import get_method_spec, method_names

        t = Table(title="methods")
        for c in ("name", "needs", "loss", "in 'all'", "source"):
            t.add_column(c)
        for n in method_names():
            s = get_method_spec(n)
            t.add_row(n, s.needs.describe(), s.loss, "yes" if s.in_all else "no", s.source)
        if not method_names():
            t.add_row("(none registered yet)", "", "", "", "")
        console.print(t)
    return 0

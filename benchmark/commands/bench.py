"""``python -m benchmark bench``: time and peak memory of one training step and one forward pass per method.

Examples::

    python -m benchmark bench --methods crossfusion,crossfusion_wo_cp --n20 13496 --in-dim 1536
    python -m benchmark bench --methods crossfusion --largest --phases train      # 137,990 / 34,500 / 8,600, 1536-d
    python -m benchmark bench --methods crossfusion --n20 2000 --official          # + the official kernel choice

Each (method, phase) runs in a fresh subprocess with ``--threads`` torch threads; peak memory is the child's
``ru_maxrss``. Bag sizes: 10x = N20 / 4 and 5x = N20 / 16 unless ``--n10`` / ``--n5`` are given.
"""
from __future__ import annotations

import argparse
import json

from benchmark.training.bench import LARGEST_SLIDE, BenchCase, bag_sizes, run_in_child
from benchmark.training.recipes import parse_assignments, parse_option_value

#: Options that reproduce the official CrossFusion code's kernel choice: attention dropout on at evaluation,
#: and PyTorch SDPA called with that dropout (the math kernel on CPU, O(N^2) memory).
OFFICIAL_OPTIONS = {"official_eval_dropout": True, "attention_backend": "sdpa"}


def _parse_options(text: str) -> dict:
    """``"a=1,b=true,c=x"`` -> ``{"a": 1, "b": True, "c": "x"}``, read as ``run --method-option`` reads them."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    return {k: parse_option_value(v) for k, v in parse_assignments(items, "--options").items()}


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time and peak memory of one training step / forward pass per method",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", required=True, help="comma list of registered methods, or 'all'")
    p.add_argument("--n20", type=int, default=None, help="patches at 20x (10x = N/4, 5x = N/16 by default)")
    p.add_argument("--n10", type=int, default=None, help="override the 10x patch count")
    p.add_argument("--n5", type=int, default=None, help="override the 5x patch count")
    p.add_argument("--in-dim", type=int, default=None, help="feature dimension (default 1536)")
    p.add_argument("--largest", action="store_true",
                   help="the largest real slide: 137,990 / 34,500 / 8,600 patches at 20x / 10x / 5x, 1536-d")
    p.add_argument("--phases", default="train,eval", help="comma list of 'train' and 'eval' (default both)")
    p.add_argument("--options", default="", help="method options for every method, e.g. 'attn_dropout=0'")
    p.add_argument("--official", action="store_true",
                   help="also run the crossfusion* methods with the official kernel choice "
                        "(official_eval_dropout=True, attention_backend=sdpa)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ... (peak GB is then the GPU's)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per child before it is killed")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from benchmark.training.registry import resolve_methods

    if args.largest:
        n20, n10, n5 = LARGEST_SLIDE["n20"], LARGEST_SLIDE["n10"], LARGEST_SLIDE["n5"]
        in_dim = args.in_dim or LARGEST_SLIDE["in_dim"]
    else:
        if args.n20 is None:
            raise ValueError("benchmark/commands/bench.py: give --n20 N or --largest")
        n20, n10, n5 = bag_sizes(args.n20, args.n10, args.n5)
        in_dim = args.in_dim or 1536
    phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    if not phases or any(ph not in ("train", "eval") for ph in phases):
        raise ValueError(f"benchmark/commands/bench.py: --phases must list 'train' and/or 'eval', got {args.phases!r}")
    options = _parse_options(args.options)

    variants = []
    for method in resolve_methods(args.methods):
        variants.append((method, options, method))
        if args.official and method.startswith("crossfusion"):
            variants.append((method, {**options, **OFFICIAL_OPTIONS}, f"{method} (official kernels)"))

    from benchmark.training.precision import resolve_device

    resolve_device(args.device)  # one line when CUDA is asked for and absent, before any child starts
    console = Console()
    console.print(f"bag: N20={n20:,}  N10={n10:,}  N5={n5:,}  in_dim={in_dim}  threads={args.threads}  "
                  f"(one fresh process per method and phase)")
    table = Table(title="one training step (fwd + bwd + Adam) and one eval forward")
    table.add_column("method", no_wrap=True)
    for col in ("params", "train s", "train peak GB", "eval s", "eval peak GB"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("note")
    rows = []
    for method, opts, label in variants:
        row = {"method": method, "label": label, "options": opts, "n20": n20, "n10": n10, "n5": n5, "in_dim": in_dim}
        for phase in phases:
            case = BenchCase(method=method, phase=phase, n20=n20, n10=n10, n5=n5, in_dim=in_dim,
                             threads=args.threads, options=opts, label=label, device=args.device)
            console.print(f"  running {label} ({phase}) ...", markup=False)
            row[phase] = run_in_child(case, args.timeout)
        rows.append(row)
        res = [row.get(ph, {}) for ph in ("train", "eval")]
        errors = "; ".join(f"{ph}: {r['error']}" for ph, r in zip(("train", "eval"), res) if "error" in r)
        params = next((r["params"] for r in res if "params" in r), None)
        fmt = lambda r, k, f: f.format(r[k]) if k in r else "-"  # noqa: E731
        peak = "peak_gpu_gb" if args.device != "cpu" else "peak_rss_gb"
        table.add_row(label, f"{params:,}" if params else "-", fmt(res[0], "seconds", "{:.1f}"),
                      fmt(res[0], peak, "{:.2f}"), fmt(res[1], "seconds", "{:.1f}"),
                      fmt(res[1], peak, "{:.2f}"), errors)
    console.print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0 if all("error" not in row.get(ph, {}) for row in rows for ph in phases) else 1

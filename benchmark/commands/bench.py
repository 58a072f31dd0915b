"""``python -m benchmark bench``: time, efficiency and peak memory of one training step and one forward pass.

Examples::

    python -m benchmark bench --methods crossfusion,crossfusion_wo_cp --average --phases train --reference
    python -m benchmark bench --methods crossfusion --largest --phases train      # 137,990 / 34,500 / 8,600, 1536-d
    python -m benchmark bench --methods crossfusion --n20 2000 --official          # + the official kernel choice

Each (method, phase) runs in a fresh subprocess with ``--threads`` torch threads; peak memory is the child's
``ru_maxrss``. Bag sizes: 10x = N20 / 4 and 5x = N20 / 16 unless ``--n10`` / ``--n5`` are given.

Efficiency: each child counts the step's model FLOPs (``torch.utils.flop_counter``, no recomputation counted)
and measures the machine's float32 matmul rate (4096 x 4096) right before every timed step; the table shows
GFLOP, GFLOP/s and MFU (achieved / the rate measured before that step) for the forward pass and the whole step. ``--reference`` times
the method's plain PyTorch reference path in the same process, alternating with it, and prints the time ratio.
"""
from __future__ import annotations

import argparse
import json

from benchmark.perf.bench import LARGEST_SLIDE, BenchCase, bag_sizes, run_in_child
from benchmark.settings.options import parse_assignments, parse_option_value


#: The paper's average slide: patches at 20x / 10x / 5x (``--average``, 1536-d unless ``--in-dim``).
AVERAGE_SLIDE = {"n20": 13_496, "n10": 3_449, "n5": 895, "in_dim": 1536}


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
    p.add_argument("--average", action="store_true",
                   help="the paper's average slide: 13,496 / 3,449 / 895 patches at 20x / 10x / 5x, 1536-d")
    p.add_argument("--phases", default="train,eval", help="comma list of 'train' and 'eval' (default both)")
    p.add_argument("--options", default="", help="method options for every method, e.g. 'attn_dropout=0'")
    p.add_argument("--official", action="store_true",
                   help="also run the crossfusion* methods with the official kernel choice "
                        "(official_eval_dropout=True, attention_backend=sdpa), each in its own process")
    p.add_argument("--reference", action="store_true",
                   help="also time each method's plain PyTorch reference path in the same process, alternating "
                        "with it, and print the time ratio (methods without a reference path: '-')")
    p.add_argument("--repeats", type=int, default=1, help="timed steps of each variant; the best is kept (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child (default 2)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda, cuda:1, ...: on a GPU the matmul rate and the peak GB are the GPU's")
    p.add_argument("--timeout", type=float, default=None, help="seconds per child before it is killed")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=run)


def _bag_from_args(args: argparse.Namespace) -> tuple[int, int, int, int]:
    """(N20, N10, N5, in_dim) from ``--largest`` / ``--average`` / ``--n20 [--n10] [--n5]``."""
    for flag, preset in (("largest", LARGEST_SLIDE), ("average", AVERAGE_SLIDE)):
        if getattr(args, flag, False):
            return preset["n20"], preset["n10"], preset["n5"], args.in_dim or preset["in_dim"]
    if args.n20 is None:
        raise ValueError("benchmark/commands/bench.py: give --n20 N, --average or --largest")
    n20, n10, n5 = bag_sizes(args.n20, args.n10, args.n5)
    return n20, n10, n5, args.in_dim or 1536


def _efficiency(res: dict) -> dict:
    """GFLOP, GFLOP/s and MFU (fraction of the child's sgemm rate) of the step and of its forward pass."""
    flops, peak = res.get("flops") or {}, res.get("sgemm_gflops")
    if "forward" not in flops or "seconds" not in res or not peak:
        return {}
    total = (flops["forward"] + flops["backward"]) / 1e9
    out = {"gflop": total, "gflops": total / res["seconds"], "mfu": total / res["seconds"] / peak}
    if res.get("forward_s"):
        out["mfu_forward"] = flops["forward"] / 1e9 / res["forward_s"] / peak
    ref = res.get("reference") or {}
    if "seconds" in ref:
        out["ratio"] = res["seconds"] / ref["seconds"]
        out["mfu_reference"] = total / ref["seconds"] / ref.get("sgemm_gflops", peak)
    return out


_COLUMNS = ("phase", "params", "s", "fwd s", "GFLOP", "GFLOP/s", "MFU fwd", "MFU", "sgemm GFLOP/s", "ref s",
            "ref MFU", "s / ref s", "peak GB")


def _table_row(label: str, phase: str, res: dict) -> list[str]:
    eff = _efficiency(res)
    fmt = lambda d, k, f: f.format(d[k]) if k in d else "-"  # noqa: E731
    ref = res.get("reference") or {}
    return [label, phase, f"{res['params']:,}" if "params" in res else "-", fmt(res, "seconds", "{:.2f}"),
            fmt(res, "forward_s", "{:.2f}"), fmt(eff, "gflop", "{:.1f}"), fmt(eff, "gflops", "{:.1f}"),
            fmt(eff, "mfu_forward", "{:.0%}"), fmt(eff, "mfu", "{:.0%}"), fmt(res, "sgemm_gflops", "{:.0f}"),
            fmt(ref, "seconds", "{:.2f}"), fmt(eff, "mfu_reference", "{:.0%}"), fmt(eff, "ratio", "{:.2f}"),
            fmt(res, "peak_gpu_gb" if "peak_gpu_gb" in res else "peak_rss_gb", "{:.2f}"), res.get("error", "")]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from benchmark.api.registry import get_method_spec, resolve_methods

    n20, n10, n5, in_dim = _bag_from_args(args)
    phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    if not phases or any(ph not in ("train", "eval") for ph in phases):
        raise ValueError(f"benchmark/commands/bench.py: --phases must list 'train' and/or 'eval', got {args.phases!r}")
    options = _parse_options(args.options)
    variants = []
    for method in resolve_methods(args.methods):
        variants.append((method, options, method))
        official = get_method_spec(method).official_options  # the official code's kernel choice, if it differs
        if args.official and official:
            variants.append((method, {**options, **official}, f"{method} (official kernels)"))

    from benchmark.fitting.precision import resolve_device

    resolve_device(args.device)  # one line when CUDA is asked for and absent, before any child starts
    console = Console(width=max(Console().width, 190))  # the table is wide; logs are not terminals
    console.print(f"bag: N20={n20:,}  N10={n10:,}  N5={n5:,}  in_dim={in_dim}  threads={args.threads}  "
                  f"(one fresh process per method and phase)")
    table = Table(title="one training step (fwd + bwd + Adam) / one eval forward; MFU = model GFLOP/s over "
                        "the child's 4096^2 sgemm rate")
    table.add_column("method", no_wrap=True)
    for col in _COLUMNS:
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("note")
    rows = []
    for method, opts, label in variants:
        row = {"method": method, "label": label, "options": opts, "n20": n20, "n10": n10, "n5": n5, "in_dim": in_dim}
        for phase in phases:
            case = BenchCase(method=method, phase=phase, n20=n20, n10=n10, n5=n5, in_dim=in_dim,
                             threads=args.threads, options=opts, label=label, repeats=args.repeats,
                             reference=args.reference, device=args.device)
            console.print(f"  running {label} ({phase}) ...", markup=False)
            row[phase] = run_in_child(case, args.timeout)
            row[phase].update(_efficiency(row[phase]))
            table.add_row(*_table_row(label, phase, row[phase]))
        rows.append(row)
    console.print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0 if all("error" not in row.get(ph, {}) for row in rows for ph in phases) else 1

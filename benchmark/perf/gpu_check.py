"""``make gpu-check``: one training step of every registered method on CUDA, in fp32 and bf16.

For each method, on a random bag with what the method needs (``benchmark.perf.bench.make_bag``):

1. the same seeded model evaluates the bag on the CPU and on the device in fp32; the largest difference of the
   risks and logits must be <= ``TOLERANCE`` (1e-4);
2. one training step (forward under the precision's autocast, backward with a gradient scaler for fp16, Adam
   step) runs once to warm up and once timed, per precision;
3. a table prints the step time, bags per second and peak device memory.

On a machine without CUDA it says so and exits 0 (nothing to check). ``--device cpu`` runs the same code on the
CPU (the tests use it; the comparison is then CPU against CPU).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from benchmark.fitting.precision import PRECISIONS, autocast, grad_scaler

TOLERANCE = 1e-4


def _outputs(model, bag) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(bag)
    parts = [out.risk.reshape(-1)] + ([out.logits.reshape(-1)] if out.logits is not None else [])
    return torch.cat([p.float().cpu() for p in parts])


def _train_step(model, bag, device: torch.device, precision: str) -> float:
    """Seconds of one forward + backward + Adam step (after a warm-up step)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = grad_scaler(device, precision)
    model.train()
    seconds = 0.0
    for _ in range(2):  # the first step warms up kernels and the allocator
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast(device, precision):
            out = model(bag)
        loss = out.risk.float().sum() + sum(a.float().sum() for a in out.aux_logits)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss.float()
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return seconds


def check_method(method: str, device: torch.device, n20: int, in_dim: int, precisions=("fp32", "bf16")) -> dict:
    """fp32 device-vs-CPU difference and the timed training step per precision of one method."""
    from benchmark.perf.bench import bag_sizes, make_bag
    from benchmark.api.registry import create_method, get_method_spec

    n20, n10, n5 = bag_sizes(n20)
    bag = make_bag(get_method_spec(method).needs, {20: n20, 10: n10, 5: n5}, in_dim, seed=0)
    torch.manual_seed(0)
    reference = create_method(method, in_dim=in_dim)
    row = {"method": method, "max_abs_diff": float((_outputs(reference, bag) -
                                                     _outputs(copy.deepcopy(reference).to(device),
                                                              bag.to(device))).abs().max())}
    if not any(p.requires_grad for p in reference.parameters()):
        return row  # nothing to train (random)
    for precision in precisions:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model = copy.deepcopy(reference).to(device)
        row[f"{precision}_s"] = _train_step(model, bag.to(device), device, precision)
        if device.type == "cuda":
            row[f"{precision}_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return row


def print_table(rows: list[dict], precisions) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one training step per method (fp32 outputs vs CPU: max |diff| <= {TOLERANCE:g})")
    for col in ["method", "max |diff|", "ok"] + [f"{p} step s" for p in precisions] + [f"{p} bags/s" for p in precisions]:
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in rows:
        if "error" in row:
            table.add_row(row["method"], "-", "[red]error[/red]", row["error"])
            continue
        steps = [f"{row[f'{p}_s']:.4f}" if f"{p}_s" in row else "-" for p in precisions]
        rates = [f"{1 / row[f'{p}_s']:.1f}" if row.get(f"{p}_s") else "-" for p in precisions]
        ok = "yes" if row["max_abs_diff"] <= TOLERANCE else "[red]NO[/red]"
        table.add_row(row["method"], f"{row['max_abs_diff']:.1e}", ok, *steps, *rates)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.perf.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma list of registered methods, or all")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, ... or cpu (to test the script)")
    parser.add_argument("--n20", type=int, default=2000, help="patches at 20x of the test bag (default 2000)")
    parser.add_argument("--in-dim", type=int, default=1024, help="feature dimension (default 1024)")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: CUDA is not available (torch {torch.__version__}); nothing to check, skipped")
        return 0
    from benchmark.api.registry import resolve_methods

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if any(p not in PRECISIONS for p in precisions):
        parser.error(f"--precisions: choose from {', '.join(PRECISIONS)}")
    rows = []
    for method in resolve_methods(args.methods):
        try:
            rows.append(check_method(method, device, args.n20, args.in_dim, precisions))
        except Exception as exc:  # noqa: BLE001 (one broken method must not hide the others)
            rows.append({"method": method, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
    print_table(rows, precisions)
    failed = [r["method"] for r in rows if "error" in r or r["max_abs_diff"] > TOLERANCE]
    if failed:
        print(f"gpu-check: FAILED for {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

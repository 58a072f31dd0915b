"""Speed and peak memory of one training step and one forward pass per method, each in a fresh process.

For every method and phase (``train``: forward + backward + Adam step in train mode; ``eval``: one forward in
eval mode under ``no_grad``), a child process (``python -m benchmark.training.bench --child JSON``) builds a random bag
of the requested size (5x / 10x / 20x features, coordinates on a square grid, k-NN graphs through
:func:`benchmark.data.graphs.build_graph` and tissue types when the method's ``Needs`` ask), builds the method
through :func:`benchmark.training.registry.create_method`, times the phase once, and reports ``ru_maxrss`` of the
child (the peak resident memory of the whole process: interpreter, torch, bag, model and the step).

The training "loss" is the sum of the risk, the auxiliary heads' logits and ``aux_loss``: the backward pass
has the cost of the real one (the survival loss itself is negligible).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: The largest real slide of the cohorts (patches at 20x / 10x / 5x) and its backbone width (UNI2-h).
LARGEST_SLIDE = {"n20": 137_990, "n10": 34_500, "n5": 8_600, "in_dim": 1536}


@dataclass
class BenchCase:
    """One child run."""

    method: str
    phase: str  # "train" or "eval"
    n20: int
    n10: int
    n5: int
    in_dim: int
    threads: int = 2
    seed: int = 0
    options: dict = field(default_factory=dict)
    label: str = ""
    device: str = "cpu"


def bag_sizes(n20: int, n10: int | None = None, n5: int | None = None) -> tuple[int, int, int]:
    """Default 10x = N20 / 4 and 5x = N20 / 16 (each magnification step quarters the patch count)."""
    if n20 < 1:
        raise ValueError(f"benchmark/training/bench.py: --n20 must be >= 1, got {n20}")
    return n20, n10 if n10 is not None else max(1, round(n20 / 4)), n5 if n5 is not None else max(1, round(n20 / 16))


def make_bag(needs, sizes: dict[int, int], in_dim: int, seed: int = 0):
    """A random bag with what ``needs`` asks for; ``sizes`` maps magnification -> patch count."""
    import torch

    from benchmark.data.bag import Bag
    from benchmark.data.graphs import build_graph

    g = torch.Generator().manual_seed(seed)
    mags = set(needs.magnifications) | ({needs.graph_magnification} if (needs.graph or needs.tissue_types) else set())
    features, coords, slide_index = {}, {}, {}
    for mag in sorted(mags):
        n = sizes[mag]
        features[mag] = torch.randn(n, in_dim, generator=g)
        side = math.ceil(math.sqrt(n))
        step = 256 * (40 // mag)  # level-0 pixels of a 256-px patch at 40x scanning
        idx = torch.arange(n)
        coords[mag] = torch.stack((idx % side, idx // side), dim=1) * step
        slide_index[mag] = torch.zeros(n, dtype=torch.int64)
    edge_index = {}
    gm = needs.graph_magnification
    for kind in needs.graph:
        points = coords[gm] if kind == "spatial" else features[gm]
        edge_index[kind] = build_graph(points, slide_index[gm], k=needs.graph_k)
    tissue = torch.randint(0, 5, (sizes[gm],), generator=g) if needs.tissue_types else None
    return Bag(sample_id="bench", slide_ids=("bench-slide",), features=features,
               coords=coords if needs.coords or needs.graph else {}, slide_index=slide_index,
               edge_index=edge_index, tissue_type=tissue)


def _rss_gb() -> float:
    """Peak resident memory of this process so far, GB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_case(case: BenchCase) -> dict:
    """Run one phase of one method in this process (called in the child)."""
    import torch

    from benchmark.training.registry import count_parameters, create_method, get_method_spec

    from benchmark.training.precision import resolve_device

    torch.set_num_threads(case.threads)
    torch.manual_seed(case.seed)
    device = resolve_device(case.device)
    spec = get_method_spec(case.method)
    bag = make_bag(spec.needs, {20: case.n20, 10: case.n10, 5: case.n5}, case.in_dim, case.seed).to(device)
    model = create_method(case.method, in_dim=case.in_dim, **case.options).to(device)
    result = {"params": count_parameters(model), "rss_before_gb": _rss_gb(), "device": str(device)}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)  # noqa: E731
    if case.phase == "train":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        sync()
        start = time.perf_counter()
        out = model(bag)
        sync()
        forward_s = time.perf_counter() - start
        loss = out.risk.sum() + sum(a.sum() for a in out.aux_logits)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        result.update(seconds=time.perf_counter() - start, forward_s=forward_s)
    else:
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            model(bag)
        sync()
        result.update(seconds=time.perf_counter() - start)
    result["peak_rss_gb"] = _rss_gb()
    if device.type == "cuda":  # the device's peak matters there, not the host's
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def run_in_child(case: BenchCase, timeout_s: float | None = None) -> dict:
    """Run ``case`` in a fresh interpreter; returns its result, or ``{"error": ...}``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(case.threads), MKL_NUM_THREADS=str(case.threads))
    cmd = [sys.executable, "-m", "benchmark.training.bench", "--child", json.dumps(asdict(case))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                              cwd=Path(__file__).resolve().parents[2])  # the repository root: this checkout's package
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode in (-9, 137):
            tail = "killed (out of memory?)"
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.training.bench")
    parser.add_argument("--child", required=True, help="BenchCase as JSON")
    args = parser.parse_args(argv)
    case = BenchCase(**json.loads(args.child))
    print(json.dumps(run_case(case)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))

"""Speed, efficiency and peak memory of one training step and one forward pass per method, in fresh processes.

For every method and phase (``train``: forward + backward + Adam step in train mode; ``eval``: one forward in
eval mode under ``no_grad``), a child process (``python -m benchmark.perf.bench --child JSON``) builds a random bag
of the requested size (5x / 10x / 20x features, coordinates on a square grid, k-NN graphs through
:func:`benchmark.data.graphs.build_graph` and tissue types when the method's ``Needs`` ask), then, in this order:

1. counts the step's model FLOPs (:func:`count_flops`, ``torch.utils.flop_counter`` on meta tensors);
2. times the step ``repeats`` times, alternating with the method's plain PyTorch reference path
   (its registered ``reference_options``) when asked, and keeps the fastest of each; right before every step it
   measures the machine's float32 matmul rate (:func:`sgemm_rate`, a 4096 x 4096 ``mm``, best of 2), the
   peak against which that step's MFU is quoted (the machine is shared and its rate drifts with the load);
3. reports ``ru_maxrss`` after the method's first step (the peak resident memory of the whole process:
   interpreter, torch, bag, model and the step; before any reference step).

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

#: Side of the square float32 matmul whose rate is the machine's peak for MFU (measured in each child).
SGEMM_SIZE = 4096



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
    repeats: int = 1  # timed steps of each variant; the best is kept
    reference: bool = False  # also time the method's registered reference path in the same process
    device: str = "cpu"  # cuda: the step runs on the GPU; the matmul rate and the peak memory are the GPU's


def bag_sizes(n20: int, n10: int | None = None, n5: int | None = None) -> tuple[int, int, int]:
    """Default 10x = N20 / 4 and 5x = N20 / 16 (each magnification step quarters the patch count)."""
    if n20 < 1:
        raise ValueError(f"benchmark/perf/bench.py: --n20 must be >= 1, got {n20}")
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


def _synchronize(device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously; a timer must not stop before them)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sgemm_rate(n: int = SGEMM_SIZE, repeats: int = 3, device="cpu") -> float:
    """GFLOP/s of an ``n x n`` float32 matmul with the current threads (or on the GPU): best of ``repeats`` after
    one warm-up."""
    import torch

    a, b, c = (torch.randn(n, n, device=device), torch.randn(n, n, device=device), torch.empty(n, n, device=device))
    torch.mm(a, b, out=c)  # warm-up: page faults of the output, thread start
    best = math.inf
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _flash_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of PyTorch's CPU flash kernel forward (not in ``torch.utils.flop_counter``): ``q k^T`` and ``P v``."""
    b, h, n, d = query_shape
    m, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * n * m * (d + d_v)


def _flash_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """Its backward counted as the math path's: four matmuls (dP, dV, dQ, dK), the recomputed ``q k^T`` not."""
    return 2 * _flash_cpu_flops(query_shape, key_shape, value_shape)


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, *args, **kwargs) -> int:
    """Convolution backward: the forward's FLOPs once per requested input / weight gradient.

    Replaces ``torch.utils.flop_counter``'s formula, which ignores ``groups`` for the weight gradient (it
    counted a depthwise 512-channel convolution's backward 500 times too high).
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _loss(out):
    """Risk + auxiliary logits + ``aux_loss``: a backward pass with the cost of the real one."""
    loss = out.risk.sum() + sum(a.sum() for a in out.aux_logits)
    return loss if out.aux_loss is None else loss + out.aux_loss


def count_flops(method: str, options: dict, bag, phase: str) -> dict:
    """Matmul / convolution FLOPs of one ``phase`` step, counted by ``FlopCounterMode`` on the meta device.

    Model FLOPs, not executed ones: recomputation is not counted. On meta tensors CrossFusion's attention
    takes the SDPA path (two matmuls forward, four backward; see :func:`_flash_cpu_backward_flops`), and its
    activation checkpointing is switched off here. Work a fast path skips exactly (TransMIL's padding rows)
    is not counted either: the count follows ``options``. Falls back to the real bag when the method cannot
    run on meta tensors (data-dependent graph code). Returns ``{"forward": F, "backward": B, "counted_on":
    device}`` (B = 0 for ``eval``), or ``{}`` when counting failed.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmark.api.registry import create_method, get_method_spec

    opts = {**options, **get_method_spec(method).flop_count_options}
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _flash_cpu_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_cpu_backward_flops,
               aten.convolution_backward: _conv_backward_flops}
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = create_method(method, in_dim=bag.in_dim, **opts)
            model.train(phase == "train")
            with torch.set_grad_enabled(phase == "train"), FlopCounterMode(display=False,
                                                                           custom_mapping=mapping) as fwd:
                out = model(bag.to(device))
            if phase != "train":
                return {"forward": fwd.get_total_flops(), "backward": 0, "counted_on": device}
            with FlopCounterMode(display=False, custom_mapping=mapping) as bwd:
                _loss(out).backward()
            return {"forward": fwd.get_total_flops(), "backward": bwd.get_total_flops(), "counted_on": device}
        except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError):
            continue
    return {}


def time_phase(model, bag, phase: str, device="cpu") -> dict:
    """One timed step: ``train`` = forward, backward + Adam step (``backward_s`` includes the step); ``eval`` =
    one forward under ``no_grad``. Returns seconds per part."""
    import torch

    if phase == "train":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        _synchronize(device)
        start = time.perf_counter()
        out = model(bag)
        _synchronize(device)
        forward_s = time.perf_counter() - start
        _loss(out).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "forward_s": forward_s, "backward_s": seconds - forward_s}
    model.eval()
    _synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model(bag)
    _synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "forward_s": seconds}


def _peak_memory(device) -> dict:
    """Peak resident memory of the process, and on CUDA the GPU's peak (the one that limits the bag size there)."""
    import torch

    out = {"peak_rss_gb": _rss_gb()}
    if device.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["seconds"]) if runs else {}


def run_case(case: BenchCase) -> dict:
    """Run one phase of one method in this process (called in the child).

    Order: the FLOP count, then ``case.repeats`` timed steps of the method, alternating with as many of its
    reference path when ``case.reference`` (so both see the same machine load). Each step is preceded by its
    own sgemm measurement (``sgemm_gflops`` of that step: MFU pairs a step with the machine's rate right
    before it). The fastest step of each variant is kept. ``peak_rss_gb`` is taken after the method's first
    step, before any reference step.
    """
    import torch

    from benchmark.fitting.precision import resolve_device
    from benchmark.api.registry import count_parameters, create_method, get_method_spec

    torch.set_num_threads(case.threads)
    device = resolve_device(case.device)
    spec = get_method_spec(case.method)
    bag = make_bag(spec.needs, {20: case.n20, 10: case.n10, 5: case.n5}, case.in_dim, case.seed)
    result = {"sgemm_gflops": sgemm_rate(device=device), "device": str(device),
              "flops": count_flops(case.method, case.options, bag, case.phase)}
    bag = bag.to(device)
    variants = {"ours": case.options}
    reference = get_method_spec(case.method).reference_options
    if case.reference and reference:
        variants["reference"] = {**case.options, **reference}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(case.repeats):
        for name, opts in variants.items():
            torch.manual_seed(case.seed)  # same weights, same dropout draws in every step of a variant
            model = create_method(case.method, in_dim=case.in_dim, **opts).to(device)
            result.setdefault("params", count_parameters(model))
            rate = sgemm_rate(repeats=2, device=device)
            runs[name].append({**time_phase(model, bag, case.phase, device), "sgemm_gflops": rate})
            del model
            if repeat == 0 and name == "ours":
                result.update(_peak_memory(device))
    result.update(_best(runs["ours"]))
    if "reference" in runs:
        result["reference"] = _best(runs["reference"])
    return result


def run_in_child(case: BenchCase, timeout_s: float | None = None) -> dict:
    """Run ``case`` in a fresh interpreter; returns its result, or ``{"error": ...}``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(case.threads), MKL_NUM_THREADS=str(case.threads))
    cmd = [sys.executable, "-m", "benchmark.perf.bench", "--child", json.dumps(asdict(case))]
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
    parser = argparse.ArgumentParser(prog="python -m benchmark.perf.bench")
    parser.add_argument("--child", required=True, help="BenchCase as JSON")
    args = parser.parse_args(argv)
    case = BenchCase(**json.loads(args.child))
    print(json.dumps(run_case(case)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))

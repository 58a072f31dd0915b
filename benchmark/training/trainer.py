"""The one trainer every method runs through: batch 1 with gradient accumulation, Adam with (coupled) weight
decay, linear warm-up then cosine decay stepped per optimiser step, a class-balanced sampler, seeds, and
the three model-selection rules (``last``, ``inner``, ``paper-max``).

Differences from the official loops (``baselines.md`` §1.8, ``crossfusion.md`` §3), on purpose:

- every epoch ends with an optimiser step on its last, possibly shorter, accumulation window, so no
  gradient leaks into the next epoch;
- the NLL of a window is its mean over the window's bags (the official codes divide by 32 even for the
  shorter leftover window; identical on full windows);
- the warm-up is a real linear LR warm-up (CrossFusion's "warm-up" only forbids checkpointing);
- the sampler tolerates empty (bin x censorship) classes (the official one divides by zero).
"""
from __future__ import annotations

import copy
import math
import random
import time as _time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from benchmark.training.losses import cox_partial_likelihood, survival_loss
from benchmark.training.metrics import c_index, evaluate
from benchmark.training.recipes import SELECTIONS, Recipe
from benchmark.training.registry import count_parameters, create_method, get_method_spec

#: ``on_epoch(epoch, epochs, info)`` progress callback (1-based epoch).
EpochCallback = Callable[[int, int, dict], None]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and, when present, CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(option: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) = CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if option is None or str(option) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(option)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {option!r} requested but CUDA is not available")
    return device


def balanced_weights(classes: Sequence[Any]) -> np.ndarray:
    """Sampling weight of each sample, ``1 / size of its class``: every non-empty class is equally likely.

    Empty classes simply do not occur (the official sampler divides by their zero count).
    """
    labels = np.asarray([str(c) for c in classes])
    if labels.size == 0:
        raise ValueError("balanced_weights: no samples")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def draw_epoch(n_samples: int, n_draws: int, generator: torch.Generator, weights: np.ndarray | None) -> list[int]:
    """Indices of the bags of one epoch: weighted draws with replacement, or a seeded shuffle (no weights)."""
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.double)
        return torch.multinomial(w, n_draws, replacement=True, generator=generator).tolist()
    perm = torch.randperm(n_samples, generator=generator).tolist()
    return (perm * math.ceil(n_draws / n_samples))[:n_draws]


def plan_windows(n_draws: int, size: int, min_last: int = 1) -> list[tuple[int, int]]:
    """Accumulation windows ``[start, stop)`` over one epoch; the last one may be shorter.

    A last window shorter than ``min_last`` is merged into the previous one (Cox heads use
    ``min_last=2``: a partial likelihood over one bag is constant).
    """
    windows = [(a, min(a + size, n_draws)) for a in range(0, n_draws, size)]
    if len(windows) > 1 and windows[-1][1] - windows[-1][0] < min_last:
        last = windows.pop()
        windows[-1] = (windows[-1][0], last[1])
    return windows


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """LR multiplier at optimiser step ``step`` (0-based): linear warm-up, then cosine decay to 0 (or constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def inner_split(sample_ids: Sequence[str], strata: Sequence[Any], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Stratified, seeded split of a training fold into (inner train, inner validation).

    Each stratum gives ``round(fraction * size)`` samples to the inner validation split (none from a stratum
    of one); the reported fold is never involved.
    """
    rng = np.random.default_rng(seed)
    ids = np.asarray(list(sample_ids), dtype=object)
    labels = np.asarray([str(s) for s in strata])
    held = []
    for label in sorted(set(labels)):
        members = ids[labels == label]
        members = members[rng.permutation(members.size)]
        k = int(round(fraction * members.size)) if members.size > 1 else 0
        held.extend(members[:k].tolist())
    held_set = set(held)
    return [s for s in ids.tolist() if s not in held_set], [s for s in ids.tolist() if s in held_set]


@dataclass
class Predictions:
    """Model outputs on a list of samples."""

    sample_ids: list[str]
    risk: np.ndarray  # (n,)
    survival: np.ndarray | None  # (n, K) or None for a Cox head


@torch.no_grad()
def predict(model: nn.Module, cohort, sample_ids: Sequence[str], device: torch.device) -> Predictions:
    """Risk (and discrete survival) of each sample, in eval mode."""
    model.eval()
    risks, survs = [], []
    for sid in sample_ids:
        out = model(cohort.bag(sid, model.needs).to(device))
        risks.append(float(out.risk.reshape(-1)[0]))
        if out.survival is not None:
            survs.append(out.survival.reshape(-1).float().cpu().numpy())
    survival = np.stack(survs) if survs and len(survs) == len(risks) else None
    return Predictions(list(sample_ids), np.asarray(risks, dtype=float), survival)


@dataclass
class CellResult:
    """Everything the result store records about one trained cell."""

    model: nn.Module
    metrics: dict[str, float]
    selected_epoch: int
    history: list[dict]
    bin_edges: list[float]
    train_risk_median: float
    predictions: list[dict]
    n_parameters: int
    extra: dict = field(default_factory=dict)
    metric_errors: dict[str, str] = field(default_factory=dict)  # metric -> why it is NaN


def _fold(cohort, fold_index: int):
    try:
        return cohort.folds[fold_index]
    except IndexError:
        raise ValueError(f"fold {fold_index} does not exist: the cohort has {len(cohort.folds)} folds") from None


def train_fold(
    cohort,
    fold_index: int,
    method: str,
    recipe: Recipe,
    selection: str = "last",
    seed: int = 0,
    device: str | torch.device = "auto",
    method_options: dict[str, Any] | None = None,
    bin_rule: str = "train",
    n_bins: int = 4,
    on_epoch: EpochCallback | None = None,
) -> CellResult:
    """Train ``method`` on one fold of ``cohort`` and evaluate it on that fold's validation (reported) split.

    Parameters
    ----------
    cohort : CohortData
        See the data contract in ``docs/ARCHITECTURE.md`` (``samples``, ``folds``, ``in_dim``, ``bag``, ``bins``).
    fold_index : int
        Which fold; its ``val`` list is the reported split.
    method : str
        Registered method name.
    recipe : Recipe
        Optimisation settings.
    selection : str
        ``last`` (last epoch), ``inner`` (best epoch on an inner split of the training fold, never looking at
        the reported split) or ``paper-max`` (best epoch on the reported split, as the CrossFusion code; optimistic).
    seed : int
        Seeds model initialisation, dropout, the sampler and the inner split.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
    method_options : dict
        Keyword options of the method's constructor.
    bin_rule : str
        Passed to ``cohort.bins`` (``train``: edges from the training fold; ``cohort``: from the whole cohort).
    n_bins : int
        Number of discrete-time bins.
    on_epoch : callable, optional
        Progress callback ``on_epoch(epoch, epochs, info)``.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; expected one of {', '.join(SELECTIONS)}")
    spec = get_method_spec(method)
    dev = resolve_device(device)
    fold = _fold(cohort, fold_index)
    train_ids, val_ids = list(fold.train), list(fold.val)
    if not train_ids or not val_ids:
        raise ValueError(f"fold {fold_index}: empty train ({len(train_ids)}) or val ({len(val_ids)}) split")
    edges, bins = cohort.bins(fold, rule=bin_rule, n_bins=n_bins)
    samples = cohort.samples
    censorship = samples["censorship"].astype(int)
    classes = [(int(bins[s]), int(censorship[s])) for s in train_ids]

    fit_ids, inner_ids = train_ids, []
    if selection == "inner":
        fit_ids, inner_ids = inner_split(train_ids, classes, recipe.inner_fraction, seed)
        if not inner_ids:
            raise ValueError(f"fold {fold_index}: the training fold is too small for an inner validation split")
    fit_classes = [(int(bins[s]), int(censorship[s])) for s in fit_ids]

    seed_everything(seed)
    model = create_method(method, in_dim=cohort.in_dim, n_bins=n_bins, **(method_options or {})).to(dev)
    n_parameters = count_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    weights = balanced_weights(fit_classes) if recipe.balanced_sampler else None
    n_draws = len(fit_ids) if recipe.max_samples_per_epoch is None else min(len(fit_ids), recipe.max_samples_per_epoch)
    is_cox = spec.loss == "cox"
    if is_cox and (recipe.accumulation < 2 or n_draws < 2):
        raise ValueError(f"method {method!r} uses a Cox loss, which needs accumulation windows of >= 2 bags")
    windows_per_epoch = len(plan_windows(n_draws, recipe.accumulation, min_last=2 if is_cox else 1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay) if trainable else None
    total_steps = recipe.epochs * windows_per_epoch
    warmup_steps = int(round(recipe.warmup_epochs * windows_per_epoch))
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, recipe.schedule))
        if optimizer is not None
        else None
    )
    time_of = samples["time"].astype(float)
    event_of = samples["event"].astype(int)

    history: list[dict] = []
    optimizer_steps = 0
    best_score, best_epoch, best_state = -math.inf, recipe.epochs, None
    for epoch in range(1, recipe.epochs + 1):
        started = _time.perf_counter()
        losses: list[float] = []
        if optimizer is not None:
            model.train()
            order = draw_epoch(len(fit_ids), n_draws, generator, weights)
            for start, stop in plan_windows(n_draws, recipe.accumulation, min_last=2 if is_cox else 1):
                optimizer.zero_grad(set_to_none=True)
                window = [fit_ids[i] for i in order[start:stop]]
                if is_cox:
                    loss = _cox_window_loss(model, cohort, window, time_of, event_of, dev)
                    if loss is not None:
                        loss.backward()
                        losses.append(float(loss.detach()))
                else:
                    total = 0.0
                    for sid in window:
                        out = model(cohort.bag(sid, model.needs).to(dev))
                        loss = survival_loss(out, int(bins[sid]), float(censorship[sid]), recipe.alpha) / len(window)
                        loss.backward()
                        total += float(loss.detach())
                    losses.append(total)
                optimizer.step()
                scheduler.step()
                optimizer_steps += 1
        info: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)) if losses else None,
            "lr": optimizer.param_groups[0]["lr"] if optimizer is not None else None,
        }
        monitor_ids = inner_ids if selection == "inner" else val_ids if selection == "paper-max" else None
        if monitor_ids is not None:
            p = predict(model, cohort, monitor_ids, dev)
            try:
                score = c_index(time_of[monitor_ids].to_numpy(), event_of[monitor_ids].to_numpy(), p.risk)
            except ValueError:
                score = float("nan")  # an inner split without events cannot select; the last epoch is kept
            info["inner_c_index" if selection == "inner" else "val_c_index"] = score
            if math.isfinite(score) and score > best_score:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(model.state_dict())
        info["seconds"] = _time.perf_counter() - started
        history.append(info)
        if on_epoch is not None:
            on_epoch(epoch, recipe.epochs, info)
        if (
            selection == "inner"
            and recipe.patience is not None
            and math.isfinite(best_score)
            and epoch - best_epoch >= recipe.patience
        ):
            break

    selected_epoch = history[-1]["epoch"]
    if best_state is not None:
        model.load_state_dict(best_state)
        selected_epoch = best_epoch

    val = predict(model, cohort, val_ids, dev)
    train_pred = predict(model, cohort, train_ids, dev)
    metric_errors: dict[str, str] = {}
    metrics = evaluate(
        time_of[val_ids].to_numpy(),
        event_of[val_ids].to_numpy(),
        val.risk,
        time_of[train_ids].to_numpy(),
        event_of[train_ids].to_numpy(),
        survival=val.survival,
        bin_edges=edges,
        errors=metric_errors,
    )
    patient_of = samples["patient_id"] if "patient_id" in samples.columns else None
    predictions = [
        {
            "sample_id": sid,
            "patient_id": str(patient_of[sid]) if patient_of is not None else sid,
            "time": float(time_of[sid]),
            "event": int(event_of[sid]),
            "risk": float(r),
        }
        for sid, r in zip(val_ids, val.risk)
    ]
    return CellResult(
        model=model.cpu(),
        metrics=metrics,
        selected_epoch=int(selected_epoch),
        history=history,
        bin_edges=[float(e) for e in np.asarray(edges)],
        train_risk_median=float(np.median(train_pred.risk)),
        predictions=predictions,
        n_parameters=n_parameters,
        metric_errors=metric_errors,
        extra={"n_train": len(train_ids), "n_fit": len(fit_ids), "n_inner": len(inner_ids), "n_val": len(val_ids),
               "draws_per_epoch": n_draws, "steps_per_epoch": windows_per_epoch, "optimizer_steps": optimizer_steps,
               "device": str(dev)},
    )


def _cox_window_loss(model: nn.Module, cohort, window: list[str], time_of, event_of, device) -> torch.Tensor | None:
    """Cox partial likelihood over one accumulation window (graphs kept until its backward), plus aux losses.

    A window without an event contributes no Cox loss; it returns None when there is nothing to back-propagate.
    """
    risks, aux = [], []
    for sid in window:
        out = model(cohort.bag(sid, model.needs).to(device))
        risks.append(out.risk.reshape(()))
        if out.aux_loss is not None:
            aux.append(out.aux_loss.reshape(()))
    t = torch.tensor([float(time_of[s]) for s in window])
    e = torch.tensor([float(event_of[s]) for s in window])
    loss = cox_partial_likelihood(torch.stack(risks), t, e)
    if aux:
        aux_mean = torch.stack(aux).mean()
        loss = aux_mean if loss is None else loss + aux_mean
    return loss

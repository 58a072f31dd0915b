"""The one trainer every method runs through: batch 1 with gradient accumulation, Adam with (coupled) weight
decay, linear warm-up then cosine decay stepped per optimiser step, a class-balanced sampler, seeds, and
the three model-selection rules (``last``, ``inner``, ``paper-max``).

Differences from the official loops (Mahmood-lab ``train_loop_survival`` and CrossFusion's ``train.py``), on purpose:

- every epoch ends with an optimiser step on its last, possibly shorter, accumulation window, so no
  gradient leaks into the next epoch;
- the NLL of a window is its mean over the window's bags (the official codes divide by 32 even for the
  shorter leftover window; identical on full windows);
- the warm-up is a real linear LR warm-up (CrossFusion's "warm-up" only forbids checkpointing);
- the sampler tolerates empty (bin x censorship) classes (the official one divides by zero).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import time as _time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from benchmark.data.bag import Needs
from benchmark.settings.config import RunConfig
from benchmark.fitting.losses import cox_partial_likelihood, survival_loss
from benchmark.evaluation.metrics import c_index, evaluate
from benchmark.fitting.precision import DeviceBags, autocast, check_precision, grad_scaler, resolve_device
from benchmark.settings.recipes import Recipe
from benchmark.api.registry import count_parameters, create_method, get_method_spec

#: ``on_epoch(epoch, epochs, info)`` progress callback (1-based epoch).
EpochCallback = Callable[[int, int, dict], None]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and, when present, CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def training_seed(config: RunConfig) -> int:
    """The seed of a cell's training randomness: model initialisation, the epoch sampler, dropout.

    ``seeding = "per-fold"`` (default): a 32-bit seed derived from ``(seed, repeat, fold)`` by numpy's
    ``SeedSequence`` (well-mixed, so neighbouring folds and seeds give unrelated streams). Each fold is then an
    independent draw of the training procedure, and the fold-to-fold spread a test over folds sees contains the
    initialisation's variance. ``seeding = "shared"``: ``seed`` for every fold, as the official codes (one
    initialisation shared by the folds: its luck is a constant offset no test over folds can see).
    """
    if config.seeding == "shared":
        return int(config.seed)
    return int(np.random.SeedSequence([int(config.seed), int(config.repeat), int(config.fold)]).generate_state(1)[0])


@dataclass
class Runtime:
    """Where and how a fold trains: the device, its bags (moved there once), autocast precision, fp16 scaler."""

    device: torch.device
    bags: DeviceBags
    precision: str = "fp32"
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, cohort, needs: Needs, device: torch.device, precision: str = "fp32") -> "Runtime":
        check_precision(precision, device)
        return cls(device, DeviceBags(lambda sid: cohort.bag(sid, needs), device), precision,
                   grad_scaler(device, precision))

    def forward(self, model: nn.Module, sample_id: str):
        """One training forward pass under the run's autocast."""
        with autocast(self.device, self.precision):
            return model(self.bags.get(sample_id))

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:  # skips the step on inf/nan gradients and adapts the scale
            self.scaler.step(optimizer)
            self.scaler.update()


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


@contextmanager
def without_automatic_maps(model: nn.Module):
    """A model whose ``return_attention`` is None (maps chosen automatically) computes none inside this block.

    Predictions never read the maps, and the models that compute them on request (CrossFusion) do so apart
    from the output (under ``no_grad``, from detached queries and keys), so the outputs are the same."""
    automatic = getattr(model, "return_attention", False) is None
    if automatic:
        model.return_attention = False
    try:
        yield model
    finally:
        if automatic:
            model.return_attention = None


@torch.no_grad()
def predict(model: nn.Module, cohort, sample_ids: Sequence[str], device: torch.device, needs: Needs,
            bags: DeviceBags | None = None) -> Predictions:
    """Risk (and discrete survival) of each sample, in eval mode and float32; ``needs`` says what each bag must
    hold; ``bags`` serves them from the device cache of a training run. Automatic attention maps are skipped
    (:func:`without_automatic_maps`)."""
    model.eval()
    risks, survs = [], []
    with without_automatic_maps(model):
        for sid in sample_ids:
            out = model(bags.get(sid) if bags is not None else cohort.bag(sid, needs).to(device))
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
    #: metric name -> why it is undefined on this fold (the metric itself is NaN)
    metric_errors: dict = field(default_factory=dict)


def _fold(cohort, fold_index: int):
    try:
        return cohort.folds[fold_index]
    except IndexError:
        raise ValueError(f"fold {fold_index} does not exist: the cohort has {len(cohort.folds)} folds") from None


@dataclass
class FoldData:
    """The labels and sample lists of one fold, as the trainer uses them."""

    train_ids: list[str]
    val_ids: list[str]
    fit_ids: list[str]  # what the model is fitted on (the training fold less the inner split)
    inner_ids: list[str]  # inner validation split (selection ``inner``), else empty
    edges: np.ndarray
    bins: Any  # Series: bin of every sample
    censorship: Any
    time_of: Any
    event_of: Any

    def classes(self, ids: Sequence[str]) -> list[tuple[int, int]]:
        """(bin, censorship) of each sample: the strata of the sampler and of the inner split."""
        return [(int(self.bins[s]), int(self.censorship[s])) for s in ids]


def patient_inner_split(samples, train_ids: list[str], strata: list, fraction: float, seed: int):
    """:func:`inner_split` by patient: a patient's samples (slides, with ``unit=slide``) never straddle the
    inner-fit and inner-validation parts. With one sample per patient it is :func:`inner_split` itself."""
    if "patient_id" not in samples.columns:
        return inner_split(train_ids, strata, fraction, seed)
    patient_of = samples["patient_id"].astype(str)
    patients = list(dict.fromkeys(patient_of[s] for s in train_ids))
    if len(patients) == len(train_ids):
        return inner_split(train_ids, strata, fraction, seed)
    first = {}
    for sid, stratum in zip(train_ids, strata):
        first.setdefault(patient_of[sid], stratum)
    _, held = inner_split(patients, [first[p] for p in patients], fraction, seed)
    held = set(held)
    return [s for s in train_ids if patient_of[s] not in held], [s for s in train_ids if patient_of[s] in held]


def fold_data(cohort, config: RunConfig, recipe: Recipe) -> FoldData:
    """Split, bins (fitted as ``config.bin_rule`` says) and the inner split of one fold."""
    fold = _fold(cohort, config.fold)
    train_ids, val_ids = list(fold.train), list(fold.val)
    if not train_ids or not val_ids:
        raise ValueError(f"fold {config.fold}: empty train ({len(train_ids)}) or val ({len(val_ids)}) split")
    edges, bins = cohort.bins(fold, rule=config.bin_rule, n_bins=config.n_bins)
    samples = cohort.samples
    data = FoldData(train_ids, val_ids, train_ids, [], edges, bins, samples["censorship"].astype(int),
                    samples["time"].astype(float), samples["event"].astype(int))
    if config.selection == "inner":
        data.fit_ids, data.inner_ids = patient_inner_split(samples, train_ids, data.classes(train_ids),
                                                           recipe.inner_fraction, config.seed)
        if not data.inner_ids:
            raise ValueError(f"fold {config.fold}: the training fold is too small for an inner validation split")
    return data


@dataclass
class Optimisation:
    """Optimiser, schedule and sampling plan of one training run."""

    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    n_draws: int
    min_last_window: int
    windows_per_epoch: int
    weights: np.ndarray | None
    steps: int = 0


def optimisation(model: nn.Module, recipe: Recipe, data: FoldData, is_cox: bool, method: str) -> Optimisation:
    """Adam with coupled weight decay, warm-up + schedule stepped per optimiser step, the sampling plan."""
    weights = balanced_weights(data.classes(data.fit_ids)) if recipe.balanced_sampler else None
    n_fit = len(data.fit_ids)
    n_draws = n_fit if recipe.max_samples_per_epoch is None else min(n_fit, recipe.max_samples_per_epoch)
    if is_cox and (recipe.accumulation < 2 or n_draws < 2):
        raise ValueError(f"method {method!r} uses a Cox loss, which needs accumulation windows of >= 2 bags")
    min_last = 2 if is_cox else 1
    windows_per_epoch = len(plan_windows(n_draws, recipe.accumulation, min_last=min_last))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        return Optimisation(None, None, n_draws, min_last, windows_per_epoch, weights)
    optimizer = torch.optim.Adam(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    total_steps = recipe.epochs * windows_per_epoch
    warmup_steps = int(round(recipe.warmup_epochs * windows_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, recipe.schedule))
    return Optimisation(optimizer, scheduler, n_draws, min_last, windows_per_epoch, weights)


def train_epoch(model: nn.Module, data: FoldData, opt: Optimisation, recipe: Recipe,
                generator: torch.Generator, runtime: Runtime, is_cox: bool) -> list[float]:
    """One epoch of batch-1 training with gradient accumulation; returns the loss of each window."""
    losses: list[float] = []
    model.train()
    order = draw_epoch(len(data.fit_ids), opt.n_draws, generator, opt.weights)
    for start, stop in plan_windows(opt.n_draws, recipe.accumulation, min_last=opt.min_last_window):
        opt.optimizer.zero_grad(set_to_none=True)
        window = [data.fit_ids[i] for i in order[start:stop]]
        if is_cox:
            loss = _cox_window_loss(model, runtime, window, data.time_of, data.event_of)
            if loss is not None:
                runtime.backward(loss)
                losses.append(float(loss.detach()))
        else:
            losses.append(_nll_window(model, runtime, window, data, recipe.alpha))
        runtime.step(opt.optimizer)
        opt.scheduler.step()
        opt.steps += 1
    return losses


def _nll_window(model: nn.Module, runtime: Runtime, window: list[str], data: FoldData, alpha: float) -> float:
    """Back-propagate the mean NLL of one window, one bag at a time (graphs freed after each bag)."""
    total = 0.0
    for sid in window:
        out = _float32(runtime.forward(model, sid))
        loss = survival_loss(out, int(data.bins[sid]), float(data.censorship[sid]), alpha) / len(window)
        runtime.backward(loss)
        total += float(loss.detach())
    return total


def _float32(out):
    """The output with its tensors in float32: the loss is computed outside autocast, in full precision."""
    names = ("risk", "logits", "hazards", "survival", "aux_loss")
    tensors = [getattr(out, n) for n in names] + list(out.aux_logits)
    if all(t is None or t.dtype == torch.float32 for t in tensors):
        return out
    changed = {n: getattr(out, n).float() for n in names if getattr(out, n) is not None}
    return dataclasses.replace(out, **changed, aux_logits=tuple(a.float() for a in out.aux_logits))


def monitored_c_index(model: nn.Module, cohort, needs, ids: list[str], data: FoldData, device,
                      bags: DeviceBags | None = None) -> float:
    """C-index on ``ids`` (the selection split); NaN when it has no comparable pair."""
    p = predict(model, cohort, ids, device, needs, bags)
    try:
        return c_index(data.time_of[ids].to_numpy(), data.event_of[ids].to_numpy(), p.risk)
    except ValueError:
        return float("nan")  # a split without events cannot select; the last epoch is kept


def train_fold(cohort, config: RunConfig, *, device: str | torch.device = "auto",
               on_epoch: EpochCallback | None = None, score_val_each_epoch: bool = False) -> CellResult:
    """Train ``config.method`` on fold ``config.fold`` of ``cohort`` and evaluate it on that fold's validation
    (reported) split.

    Parameters
    ----------
    cohort : CohortData
        See the data contract in ``docs/ARCHITECTURE.md`` (``samples``, ``folds``, ``in_dim``, ``bag``, ``bins``).
    config : RunConfig
        Method and its options, recipe, selection rule (``last``; ``inner``: best epoch on an inner split of the
        training fold, by patient, never looking at the reported split; ``paper-max``: best epoch on the
        reported split, as the CrossFusion code, optimistic), seed and seeding (model initialisation, dropout and
        sampler: :func:`training_seed`; the inner split: ``seed``), bin rule and bin count.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
    on_epoch : callable, optional
        Progress callback ``on_epoch(epoch, epochs, info)``; ``info`` holds the epoch's monitored C-index.
    score_val_each_epoch : bool
        Also put the C-index of the validation split in ``info["val_c_index"]`` every epoch, without selecting
        on it. The tuner uses it to prune trials, on a cohort view whose validation split is an inner split of
        the outer training fold (``benchmark.tuning.study``); never set it on an outer fold.
    """
    recipe, spec, dev = config.resolved_recipe(), get_method_spec(config.method), resolve_device(device)
    data = fold_data(cohort, config, recipe)
    seed = training_seed(config)
    seed_everything(seed)
    model = create_method(config.method, in_dim=cohort.in_dim, n_bins=config.n_bins, **config.options).to(dev)
    runtime = Runtime.create(cohort, spec.needs, dev, config.precision)
    generator = torch.Generator().manual_seed(seed)
    is_cox = spec.loss == "cox"
    opt = optimisation(model, recipe, data, is_cox, config.method)
    monitor_ids = {"inner": data.inner_ids, "paper-max": data.val_ids}.get(config.selection)
    history: list[dict] = []
    best_score, best_epoch, best_state = -math.inf, recipe.epochs, None
    for epoch in range(1, recipe.epochs + 1):
        started = _time.perf_counter()
        losses = [] if opt.optimizer is None else train_epoch(
            model, data, opt, recipe, generator, runtime, is_cox)
        info: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                                "lr": opt.optimizer.param_groups[0]["lr"] if opt.optimizer is not None else None}
        if monitor_ids is not None:
            score = monitored_c_index(model, cohort, spec.needs, monitor_ids, data, dev, runtime.bags)
            info["inner_c_index" if config.selection == "inner" else "val_c_index"] = score
            if math.isfinite(score) and score > best_score:
                best_score, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
        if score_val_each_epoch and "val_c_index" not in info:
            info["val_c_index"] = monitored_c_index(model, cohort, spec.needs, data.val_ids, data, dev)
        info["seconds"] = _time.perf_counter() - started
        history.append(info)
        if on_epoch is not None:
            on_epoch(epoch, recipe.epochs, info)
        if _patience_exhausted(config.selection, recipe.patience, best_score, epoch - best_epoch):
            break
    selected_epoch = history[-1]["epoch"]
    if best_state is not None:
        model.load_state_dict(best_state)
        selected_epoch = best_epoch
    result = _evaluate_fold(model, cohort, spec.needs, data, runtime, selected_epoch, history, opt)
    result.extra["training_seed"] = seed  # recorded with the fold's facts (``data_sizes``)
    return result


def _patience_exhausted(selection: str, patience: int | None, best_score: float, epochs_since_best: int) -> bool:
    return (selection == "inner" and patience is not None and math.isfinite(best_score)
            and epochs_since_best >= patience)


def _evaluate_fold(model: nn.Module, cohort, needs, data: FoldData, runtime: Runtime, selected_epoch: int,
                   history: list[dict], opt: Optimisation) -> CellResult:
    """Evaluate the selected model on the reported split once; everything the store records."""
    device = runtime.device
    val = predict(model, cohort, data.val_ids, device, needs, runtime.bags)
    train_pred = predict(model, cohort, data.train_ids, device, needs, runtime.bags)
    metric_errors: dict[str, str] = {}
    metrics = evaluate(
        data.time_of[data.val_ids].to_numpy(), data.event_of[data.val_ids].to_numpy(), val.risk,
        data.time_of[data.train_ids].to_numpy(), data.event_of[data.train_ids].to_numpy(),
        survival=val.survival, bin_edges=data.edges, errors=metric_errors,
    )
    samples = cohort.samples
    patient_of = samples["patient_id"] if "patient_id" in samples.columns else None
    predictions = [
        {"sample_id": sid, "patient_id": str(patient_of[sid]) if patient_of is not None else sid,
         "time": float(data.time_of[sid]), "event": int(data.event_of[sid]), "risk": float(r)}
        for sid, r in zip(data.val_ids, val.risk)
    ]
    return CellResult(
        model=model.cpu(), metrics=metrics, selected_epoch=int(selected_epoch), history=history,
        bin_edges=[float(e) for e in np.asarray(data.edges)], train_risk_median=float(np.median(train_pred.risk)),
        predictions=predictions, n_parameters=count_parameters(model), metric_errors=metric_errors,
        extra={"n_train": len(data.train_ids), "n_fit": len(data.fit_ids), "n_inner": len(data.inner_ids),
               "n_val": len(data.val_ids), "draws_per_epoch": opt.n_draws,
               "steps_per_epoch": opt.windows_per_epoch,
               "optimizer_steps": opt.steps, "device": str(device), "mean_patches": _mean_patches(runtime.bags),
               **({"tissue_types": sorted(model.tissue_types_used)} if getattr(model, "tissue_types_used", None) else {})},
    )


def _mean_patches(bags: DeviceBags) -> float | None:
    """Mean patch count of the bags the fold used: the bag size of the cost model (``benchmark.execution.cost``)."""
    counts = list(bags.patch_counts.values())
    return float(np.mean(counts)) if counts else None


def _cox_window_loss(model: nn.Module, runtime: Runtime, window: list[str], time_of,
                     event_of) -> torch.Tensor | None:
    """Cox partial likelihood over one accumulation window (graphs kept until its backward), plus aux losses.

    A window without an event contributes no Cox loss; it returns None when there is nothing to back-propagate.
    """
    risks, aux = [], []
    for sid in window:
        out = _float32(runtime.forward(model, sid))
        risks.append(out.risk.reshape(()))
        if out.aux_loss is not None:
            aux.append(out.aux_loss.reshape(()))
    t = torch.tensor([float(time_of[s]) for s in window], device=runtime.device)
    e = torch.tensor([float(event_of[s]) for s in window], device=runtime.device)
    loss = cox_partial_likelihood(torch.stack(risks), t, e)
    if aux:
        aux_mean = torch.stack(aux).mean()
        loss = aux_mean if loss is None else loss + aux_mean
    return loss

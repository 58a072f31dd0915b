"""How long cells take: the cost model behind ``run --dry-run`` and the progress bar's ETA.

A cell's work is counted in **draws**: every training draw (one bag through forward + backward) is one, every
evaluation forward (the reported fold and the training fold, once each at the end; the monitored split every
epoch for ``inner`` / ``paper-max``) counts ``EVAL_WEIGHT``. Its cost is

    seconds = CELL_OVERHEAD_S + draws x seconds_per_draw(method) x (mean patches per bag / reference patches)

``seconds_per_draw`` starts from the method's registered ``cost_prior`` (measured on a 2-core CPU, demo BLCA, one torch
thread; docs/CORE.md "Grid cost") and is replaced by what the store has measured: the median over the method's
finished records (their ``seconds``, ``history`` and ``data_sizes``) of seconds per draw, normalised by their bag
size. Cells of the same method, cohort and backbone already in the store are the most faithful reference, so they
are used before the method's other cells. While a grid runs, the ETA scales the remaining estimate by the ratio
of measured to estimated time of the cells finished so far.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

#: An evaluation forward costs about a third of a training draw (no backward, no optimiser step).
EVAL_WEIGHT = 0.35
#: Bag size (mean 20x patches of a patient bag) the priors were measured at (demo BLCA).
REFERENCE_PATCHES = 61.0
#: Seconds of a cell that do not scale with its draws (loading the cohort in a fresh worker, writing the record).
CELL_OVERHEAD_S = 1.0
#: A method without a prior or a measurement (e.g. a plugin) is assumed to cost this much.
UNKNOWN_SECONDS_PER_DRAW = 0.1


def prior_seconds_per_draw(method: str) -> float | None:
    """The method's registered ``cost_prior`` (None for an unknown method or one without a prior)."""
    from benchmark.api.registry import get_method_spec

    try:
        return get_method_spec(method).cost_prior
    except KeyError:
        return None


def cell_draws(epochs: int, draws_per_epoch: int, n_train: int, n_val: int, monitored: int = 0) -> float:
    """Work of one cell in draws: training draws plus weighted evaluation forwards."""
    evaluations = n_train + n_val + epochs * monitored
    return epochs * draws_per_epoch + EVAL_WEIGHT * evaluations


def record_draws(record: dict) -> float | None:
    """The work a finished record did, from its history and data sizes (None when they are missing)."""
    sizes = record.get("data_sizes") or {}
    history = record.get("history") or []
    if not history or "draws_per_epoch" not in sizes:
        return None
    monitored = sizes.get("n_inner") or 0
    if record.get("selection") == "paper-max":
        monitored = sizes.get("n_val") or 0
    return cell_draws(len(history), sizes["draws_per_epoch"], sizes.get("n_train") or 0, sizes.get("n_val") or 0,
                      monitored)


@dataclass
class CostModel:
    """Seconds per draw at the reference bag size, per method, from priors refined by measured records."""

    measured: dict[tuple, list[float]] = field(default_factory=dict)  # (method[, cohort, backbone]) -> s/draw
    patches: dict[tuple, float] = field(default_factory=dict)  # (cohort, backbone) -> mean patches per bag

    @classmethod
    def from_records(cls, records: list[dict]) -> "CostModel":
        """Learn from the ``ok`` records (with ``seconds``) of a store."""
        model = cls()
        for record in records:
            if record.get("status") == "ok":
                model.add(record)
        return model

    def add(self, record: dict) -> None:
        """Learn from one finished record."""
        draws, seconds = record_draws(record), record.get("seconds")
        if not draws or not seconds:
            return
        patches = (record.get("data_sizes") or {}).get("mean_patches") or REFERENCE_PATCHES
        self.patches[(record["cohort"], record["backbone"])] = patches
        per_draw = max(0.0, seconds - CELL_OVERHEAD_S) / draws * (REFERENCE_PATCHES / patches)
        for key in ((record["method"],), (record["method"], record["cohort"], record["backbone"])):
            self.measured.setdefault(key, []).append(per_draw)

    def seconds_per_draw(self, method: str, cohort: str | None = None, backbone: str | None = None) -> tuple[float, str]:
        """Seconds per draw at the reference bag size, and where the number comes from."""
        for key, source in (((method, cohort, backbone), "of this cohort and backbone"), ((method,), "")):
            if key in self.measured:
                n = len(self.measured[key])
                return statistics.median(self.measured[key]), f"measured ({n} cell{'s' * (n != 1)} {source})".replace(" )", ")")
        prior = prior_seconds_per_draw(method)
        if prior is not None:
            return prior, "prior (2-core CPU)"
        return UNKNOWN_SECONDS_PER_DRAW, "guess (no prior)"

    def estimate(self, method: str, draws: float, patches: float | None = None, cohort: str | None = None,
                 backbone: str | None = None) -> float:
        """Seconds of a cell of ``draws`` draws on bags of ``patches`` mean patches."""
        per_draw, _ = self.seconds_per_draw(method, cohort, backbone)
        patches = patches or self.patches.get((cohort, backbone)) or REFERENCE_PATCHES
        return CELL_OVERHEAD_S + draws * per_draw * (patches / REFERENCE_PATCHES)


class Eta:
    """Remaining time of a running grid: the estimates of the unfinished cells, scaled by how the finished cells
    compared with their estimates, spread over the executor's parallel slots."""

    def __init__(self, estimates: dict[str, float], parallelism: float = 1.0) -> None:
        self.estimates, self.parallelism = dict(estimates), max(1.0, parallelism)
        self.estimated_done = 0.0
        self.measured_done = 0.0

    def finished(self, key: str, seconds: float | None) -> None:
        """A cell finished after ``seconds`` (None: failed or skipped; it no longer counts)."""
        estimate = self.estimates.pop(key, None)
        if estimate is not None and seconds is not None and estimate > 0:
            self.estimated_done += estimate
            self.measured_done += seconds

    def remaining_seconds(self) -> float:
        ratio = self.measured_done / self.estimated_done if self.estimated_done > 0 else 1.0
        return sum(self.estimates.values()) * ratio / self.parallelism


def format_seconds(seconds: float) -> str:
    """``42 s``, ``7.5 min``, ``2.3 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

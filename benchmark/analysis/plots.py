"""The paper's figures from the result store: Kaplan-Meier curves with the log-rank test (Figure 2) and
attention heatmaps (Figure 3).

Kaplan-Meier
    For each fold the validation patients are split into high and low risk (high = ``risk >= threshold``),
    the folds are pooled, and both groups get a Kaplan-Meier curve with 95% confidence bands, an at-risk
    table and the log-rank p-value (lifelines ``KaplanMeierFitter``, ``add_at_risk_counts``, ``logrank_test``).
    Two thresholds:

    - ``train-median`` (default): the median risk of the fold's *training* samples (record field
      ``train_risk_median``), so no validation label or risk informs the split;
    - ``pooled-median``: the median of the pooled out-of-fold risks, the choice of the official CrossFusion
      code (``utils/valid_utils.py``), which looks at every validation risk at once.

    Curves are per patient: when a cell was run at slide level, a patient's slide risks are averaged
    (its slides share one fold, time and event). The official code plotted slides, counting multi-slide
    patients several times.

Heatmaps
    :func:`attention_heatmaps` runs a fold's trained model (loaded from the store, or re-trained, by the
    ``plot heatmap`` command: plotting never trains) in eval mode on the bag holding the slide, and draws each
    returned :class:`~benchmark.api.output.AttentionMap` on the patch grid at its magnification's coordinates,
    or, given the slide's image, over its thumbnail (:mod:`benchmark.analysis.heatmaps`, which also saves the
    top patches and the QuPath GeoJSON). On synthetic cohorts the stored tissue types and planted signal are
    drawn beside them and the overlap is reported (:func:`attention_signal_overlap`).

All figures use matplotlib's Agg backend and its default fonts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from lifelines import KaplanMeierFitter  # noqa: E402
from lifelines.plotting import add_at_risk_counts  # noqa: E402
from lifelines.statistics import logrank_test  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from scipy.stats import rankdata  # noqa: E402

from benchmark.analysis.heatmaps import (  # noqa: E402
    SlideOverlay, panel_title, percentile_rank, slide_figure, slide_overlay, top_patches, write_geojson,
)
from benchmark.analysis.statistics import pooled_predictions  # noqa: E402
from benchmark.data.cohorts import get_backbone  # noqa: E402
from benchmark.data.bag import Needs  # noqa: E402
from benchmark.data.features import level0_patch_size  # noqa: E402
from benchmark.data.slides import PatchGeometry, open_slide, patch_geometry  # noqa: E402
from benchmark.data.synth import SCHEMA, synthetic_parameters  # noqa: E402
from benchmark.naming import path_under, safe_name  # noqa: E402
from benchmark.store.query import Results, read_records, select_cell  # noqa: E402
from benchmark.api.registry import get_method_spec  # noqa: E402

SPLIT_RULES = ("train-median", "pooled-median")
SPLIT_DESCRIPTIONS = {
    "train-median": "split per fold at the training-fold median risk, folds pooled",
    "pooled-median": "split at the pooled out-of-fold median risk (official CrossFusion code)",
}
LOW_COLOR, HIGH_COLOR = "tab:blue", "tab:red"


# --------------------------------------------------------------------------------------------------
# Kaplan-Meier with log-rank
# --------------------------------------------------------------------------------------------------
@dataclass
class KMResult:
    """Numbers behind one Kaplan-Meier panel.

    Attributes
    ----------
    method, cohort, split : str
    groups : DataFrame
        One row per patient: ``patient_id, time, event, risk, fold, threshold, high_risk`` (bool).
    p_value, test_statistic : float
        Log-rank test of high vs low risk (NaN when a group is empty).
    n_high, n_low, events_high, events_low : int
    median_survival_high, median_survival_low : float
        Kaplan-Meier median survival in months (inf when the curve stays above 0.5).
    files : list of Path
        Figures written for this result.
    """

    method: str
    cohort: str
    split: str
    groups: pd.DataFrame = field(repr=False)
    p_value: float
    test_statistic: float
    n_high: int
    n_low: int
    events_high: int
    events_low: int
    median_survival_high: float
    median_survival_low: float
    files: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "method": self.method, "cohort": self.cohort, "split": self.split, "p_value": self.p_value,
            "test_statistic": self.test_statistic, "n_high": self.n_high, "n_low": self.n_low,
            "events_high": self.events_high, "events_low": self.events_low,
            "median_survival_high": self.median_survival_high, "median_survival_low": self.median_survival_low,
            "files": [str(f) for f in self.files],
        }


def km_groups(records: Sequence[Mapping], split: str = "train-median") -> pd.DataFrame:
    """Patient-level high/low risk groups of one cell (fold records), pooled over folds.

    Parameters
    ----------
    records : sequence of dict
        The fold records of one cell.
    split : {"train-median", "pooled-median"}
        Threshold rule (see the module docstring). High risk = ``risk >= threshold``.

    Returns
    -------
    DataFrame indexed by ``patient_id`` with columns ``time, event, risk, fold, threshold, high_risk``.
    """
    if split not in SPLIT_RULES:
        raise ValueError(f"unknown split rule {split!r}; expected one of {', '.join(SPLIT_RULES)}")
    preds = pooled_predictions(records)
    patients = preds.groupby("patient_id").agg(
        time=("time", "first"), event=("event", "first"), risk=("risk", "mean"), fold=("fold", "first")
    )
    if split == "train-median":
        thresholds = {}
        for r in records:
            value = r.get("train_risk_median")
            if value is None:
                raise ValueError(
                    f"{r.get('_path', 'record')}: no train_risk_median stored for fold {r.get('fold')}; "
                    "use --split pooled-median"
                )
            thresholds[int(r["fold"])] = float(value)
        patients["threshold"] = patients["fold"].map(thresholds)
    else:
        patients["threshold"] = float(np.median(patients["risk"].to_numpy()))
    patients["high_risk"] = patients["risk"] >= patients["threshold"]
    return patients


def km_analysis(records: Sequence[Mapping], split: str = "train-median") -> KMResult:
    """Groups and log-rank test of one cell (no figure)."""

    groups = km_groups(records, split)
    high, low = groups[groups["high_risk"]], groups[~groups["high_risk"]]
    if len(high) and len(low):
        test = logrank_test(high["time"], low["time"], event_observed_A=high["event"], event_observed_B=low["event"])
        p, stat = float(test.p_value), float(test.test_statistic)
    else:  # e.g. every validation risk above the training median: nothing to test
        p = stat = float("nan")

    def median_of(df: pd.DataFrame) -> float:
        if not len(df):
            return float("nan")
        return float(KaplanMeierFitter().fit(df["time"], df["event"]).median_survival_time_)

    return KMResult(
        method=str(records[0].get("method")), cohort=str(records[0].get("cohort")), split=split, groups=groups,
        p_value=p, test_statistic=stat, n_high=len(high), n_low=len(low),
        events_high=int(high["event"].sum()), events_low=int(low["event"].sum()),
        median_survival_high=median_of(high), median_survival_low=median_of(low),
    )


def format_p(p: float) -> str:
    if not np.isfinite(p):
        return "n/a (one group empty)"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def draw_km(ax: plt.Axes, result: KMResult, at_risk: bool = True, subtitle: str | None = None) -> None:
    """Draw both Kaplan-Meier curves (95% bands) of ``result`` on ``ax``, with an at-risk table below."""

    fitters = []
    for is_high, label, color in ((False, "low risk", LOW_COLOR), (True, "high risk", HIGH_COLOR)):
        df = result.groups[result.groups["high_risk"] == is_high]
        if not len(df):
            continue
        kmf = KaplanMeierFitter(label=f"{label} (n={len(df)})")
        kmf.fit(df["time"], df["event"])
        kmf.plot_survival_function(ax=ax, ci_show=True, color=color)
        fitters.append(kmf)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("months")
    ax.set_ylabel("survival probability")
    title = f"{result.cohort.upper()} - {result.method}: log-rank p = {format_p(result.p_value)}"
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    if at_risk and fitters:
        add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"], labels=[f.label.split(" (")[0] for f in fitters])


def figure_stem(out: str | Path, *parts: object) -> Path:
    """``out/<parts joined by _>`` as a sanitised file stem that stays inside ``out``: names (slide IDs, methods,
    cohorts) can hold dots, separators or ``..`` and must not place a figure elsewhere."""
    return path_under(out, safe_name("_".join(str(p) for p in parts)))


def _save(fig: plt.Figure, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    # suffixes appended, not substituted: TCGA slide IDs hold dots (...-DX1.<uuid>)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def plot_km(
    results: Results,
    method: str,
    dataset: str | Sequence[str] = "all",
    *,
    split: str = "train-median",
    out: str | Path | None = None,
    layout: str | None = None,
    backbone: str | None = None,
    recipe: str | None = None,
    selection: str | None = None,
    seed: int | None = None,
) -> list[KMResult]:
    """Kaplan-Meier figures of one method: one panel per cohort, or one figure per cohort.

    Parameters
    ----------
    results : Results
        The result store, read (:class:`benchmark.store.query.Results`).
    method : str
        Method whose out-of-fold risks are split.
    dataset : str or list of str
        A cohort, a comma list, or ``"all"`` (every cohort with results for ``method``).
    split : {"train-median", "pooled-median"}
        Threshold rule (stated in each figure).
    out : path, optional
        Output folder (default ``<results>/figures``).
    layout : {"panels", "figures"}, optional
        One figure with a panel per cohort (default for several cohorts) or one figure per cohort.
    backbone, recipe, selection, seed : optional
        Pick the cell when the store holds several for a cohort.

    Returns
    -------
    list of KMResult
        One per cohort, with ``files`` set (PNG and PDF).
    """
    if split not in SPLIT_RULES:
        raise ValueError(f"unknown split rule {split!r}; expected one of {', '.join(SPLIT_RULES)}")
    if isinstance(dataset, str) and dataset.lower() == "all":
        cohorts = sorted({r["cohort"] for r in read_records(results, method=method, backbone=backbone,
                                                            recipe=recipe, selection=selection, seed=seed)})
        if not cohorts:
            raise FileNotFoundError(f"{results.root}: no successful records of method {method!r}")
    else:
        cohorts = [c.strip() for c in dataset.split(",")] if isinstance(dataset, str) else list(dataset)
    layout = layout or ("panels" if len(cohorts) > 1 else "figures")
    if layout not in ("panels", "figures"):
        raise ValueError(f"unknown layout {layout!r}; expected 'panels' or 'figures'")
    out = Path(out) if out is not None else results.root / "figures"
    kms = [
        km_analysis(select_cell(results, method, c, backbone=backbone, recipe=recipe, selection=selection, seed=seed), split)
        for c in cohorts
    ]
    note = SPLIT_DESCRIPTIONS[split]
    if layout == "figures":
        for km in kms:
            fig, ax = plt.subplots(figsize=(6, 5))
            draw_km(ax, km, subtitle=note)
            km.files = _save(fig, figure_stem(out, "km", km.method, km.cohort, split))
    else:
        ncols = min(3, len(kms))
        nrows = -(-len(kms) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 5.4 * nrows), squeeze=False)
        for ax, km in zip(axes.flat, kms):
            draw_km(ax, km)
        for ax in list(axes.flat)[len(kms):]:
            ax.axis("off")
        fig.suptitle(f"{kms[0].method}: Kaplan-Meier by predicted risk ({note})", fontsize=11)
        fig.tight_layout(h_pad=6.0)
        name = "all" if isinstance(dataset, str) and dataset.lower() == "all" else "-".join(cohorts)
        files = _save(fig, figure_stem(out, "km", kms[0].method, name, split))
        for km in kms:
            km.files = files
    return kms


# --------------------------------------------------------------------------------------------------
# Attention heatmaps
# --------------------------------------------------------------------------------------------------
#: Panel order of known attention maps (CrossFusion's four, then the rest alphabetically).
MAP_ORDER = ("coarse_cross", "fine_cross", "source_transformer", "final_transformer", "final_cls", "attention")
TISSUE_NAMES = ("tumour", "stroma", "lymphocytes", "necrosis", "other")
TISSUE_COLORS = ("#d62728", "#e377c2", "#1f77b4", "#7f7f7f", "#bcbd22")
TOP_FRACTION = 0.10


@dataclass
class PatchMap:
    """One map on one slide: patch coordinates and a value per patch."""

    name: str
    magnification: int
    coords: np.ndarray  # (N, 2) level-0 (x, y) top-left pixels
    values: np.ndarray  # (N,)


@dataclass
class HeatmapResult:
    """What :func:`attention_heatmaps` drew and measured.

    Attributes
    ----------
    maps : list of PatchMap
        The method's attention maps restricted to the slide (raw scores).
    tissue : dict of int to PatchMap
        Tissue type per patch at each drawn magnification (when the cohort has tissue types).
    signal : dict of int to PatchMap
        Tumour fraction of each patch's area at each magnification (0..1), from the 20x tissue types.
    overlap : dict of str to dict
        Per map, :func:`attention_signal_overlap` against ``signal > 0`` at the map's magnification.
    geometry : dict of int to PatchGeometry
        Patch side (level-0 pixels) and encoder-input size per magnification, and where they were read.
    overlay : SlideOverlay or None
        The maps over the slide image (with a slide file).
    """

    method: str
    cohort: str
    fold: int
    slide_id: str
    sample_id: str
    maps: list[PatchMap]
    tissue: dict[int, PatchMap] = field(default_factory=dict)
    signal: dict[int, PatchMap] = field(default_factory=dict)
    overlap: dict[str, dict] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    geometry: dict[int, PatchGeometry] = field(default_factory=dict)
    overlay: SlideOverlay | None = None


def attention_signal_overlap(scores: np.ndarray, signal: np.ndarray, top_fraction: float = TOP_FRACTION) -> dict:
    """How well a map's attention picks out signal-carrying patches.

    Parameters
    ----------
    scores : ndarray, shape (N,)
        Attention per patch (any scale; only the order matters).
    signal : ndarray, shape (N,), bool
        True for patches that carry the planted signal.
    top_fraction : float
        Share of patches counted as "top attention" (at least one patch).

    Returns
    -------
    dict
        ``auc``: ROC AUC of the scores for separating signal from other patches (0.5 = chance, 1 = every
        signal patch above every other; ties count one half; NaN when all or no patches carry signal);
        ``top_precision``: share of the top ``top_fraction`` attention patches that carry signal;
        ``prevalence``: share of all patches that carry signal (the ``top_precision`` of a random map);
        ``enrichment``: ``top_precision / prevalence``; ``n_patches``, ``n_signal``, ``top_fraction``.
    """

    s = np.asarray(scores, float)
    y = np.asarray(signal, bool)
    n, n_pos = len(s), int(y.sum())
    n_neg = n - n_pos
    if n_pos and n_neg:
        ranks = rankdata(s)  # average ranks: ties count one half (Mann-Whitney U)
        auc = float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    else:
        auc = float("nan")
    k = max(1, int(round(top_fraction * n)))
    top = np.argsort(-s, kind="stable")[:k]
    precision = float(y[top].mean()) if n else float("nan")
    prevalence = n_pos / n if n else float("nan")
    return {
        "auc": auc, "top_precision": precision, "prevalence": prevalence,
        "enrichment": precision / prevalence if prevalence else float("nan"),
        "n_patches": n, "n_signal": n_pos, "top_fraction": top_fraction,
    }


def tumour_fraction(coords: np.ndarray, patch_size: float, coords20: np.ndarray, types20: np.ndarray) -> np.ndarray:
    """Share of tumour (type 0) among the 20x patches whose top-left corner lies inside each patch's area.

    Parameters
    ----------
    coords : (N, 2) level-0 top-left corners of the patches at some magnification
    patch_size : level-0 side of those patches
    coords20, types20 : (M, 2) corners and (M,) tissue types of the slide's 20x patches
    """
    if len(coords20) == 0 or len(coords) == 0:
        return np.zeros(len(coords))
    # the coarse grid is aligned to its own patches: index both sets of corners on it
    origin = coords.min(0)
    size = max(float(patch_size), 1.0)
    cell = np.floor((coords20 - origin) / size).astype(np.int64)
    keys = np.floor((coords - origin) / size).astype(np.int64)
    frame = pd.DataFrame({"x": cell[:, 0], "y": cell[:, 1], "tumour": (types20 == 0).astype(float)})
    frac = frame.groupby(["x", "y"])["tumour"].mean()
    index = pd.MultiIndex.from_arrays([keys[:, 0], keys[:, 1]])
    return frac.reindex(index).fillna(0.0).to_numpy()


def grid_step(coords: np.ndarray) -> float:
    """Patch side in level-0 pixels, read off the coordinates (smallest positive gap between distinct x or y)."""
    gaps = []
    for axis in (0, 1):
        u = np.unique(coords[:, axis])
        if len(u) > 1:
            gaps.append(np.diff(u).min())
    return float(min(gaps)) if gaps else 1.0


def draw_patch_map(ax: plt.Axes, coords: np.ndarray, values: np.ndarray, step: float, extent: tuple,
                   cmap="inferno", vmin=None, vmax=None, categorical: bool = False):
    """Paint one value per patch on its grid cell (background transparent); returns the image artist."""
    x0, y0, x1, y1 = extent
    width = max(1, int(np.ceil((x1 - x0) / step)))
    height = max(1, int(np.ceil((y1 - y0) / step)))
    image = np.full((height, width), np.nan)
    ix = np.floor((coords[:, 0] - x0) / step).astype(int)
    iy = np.floor((coords[:, 1] - y0) / step).astype(int)
    image[iy, ix] = values
    if categorical:

        cm = ListedColormap(TISSUE_COLORS)
        artist = ax.imshow(image, cmap=cm, norm=BoundaryNorm(np.arange(-0.5, 5.5), cm.N), interpolation="nearest",
                           extent=(x0, x0 + width * step, y0 + height * step, y0))
    else:
        artist = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
                           extent=(x0, x0 + width * step, y0 + height * step, y0))
    ax.set_xlim(x0, x1)  # the shared extent, so panels of different magnifications line up
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return artist


def sample_of_slide(samples: pd.DataFrame, slide: str) -> str:
    """The sample whose ``slide_ids`` hold ``slide`` (or ``slide`` itself when it is a sample id)."""
    for sample_id, slide_ids in samples["slide_ids"].items():
        if slide in tuple(slide_ids):
            return str(sample_id)
    if slide in samples.index:
        return str(slide)
    some = ", ".join(str(s) for s in list(samples["slide_ids"].explode().head(5)))
    raise KeyError(f"slide {slide!r} is in no sample of this cohort (e.g. {some})")


def fold_record_for(records: Sequence[Mapping], sample_id: str, fold: int | None) -> Mapping:
    """The record of ``fold``, or by default the fold whose validation split holds ``sample_id``
    (so the map comes from a model that never trained on the slide)."""
    by_fold = {int(r["fold"]): r for r in records}
    if fold is not None:
        if fold not in by_fold:
            raise KeyError(f"fold {fold} has no successful record (have {sorted(by_fold)})")
        return by_fold[fold]
    for r in records:
        if any(str(p["sample_id"]) == sample_id for p in r.get("predictions") or []):
            return r
    return records[0]


def stale_data_reason(record: Mapping) -> str | None:
    """Why a record's model no longer matches the embedded synthetic data it would be re-run on (None if it does).

    Its weights were trained on another generator version or other backbone parameters, so its maps on today's
    features would mean nothing. Real-data records (a ``data_root`` or a ``clinical`` table) are never judged
    stale here.
    """

    config = record.get("config") or {}
    real = config.get("data_root") is not None or config.get("clinical") is not None
    if real or config.get("synthetic_version") is None:
        return None
    if config["synthetic_version"] != SCHEMA:
        return f"trained on synthetic data version {config['synthetic_version']}, the generator is now at {SCHEMA}"
    now = synthetic_parameters(get_backbone(str(record["backbone"])))
    if config.get("synthetic_backbone", now) != now:
        return f"trained with {record['backbone']} generator parameters {config['synthetic_backbone']}, now {now}"
    return None


def _ordered(names: Sequence[str]) -> list[str]:
    known = [n for n in MAP_ORDER if n in names]
    return known + sorted(n for n in names if n not in MAP_ORDER)


def _slide_rows(bag, magnification: int, slide_id: str) -> np.ndarray:
    n = bag.num_patches(magnification)
    index = bag.slide_index.get(magnification) if bag.slide_index else None
    if index is None or len(bag.slide_ids) == 1:
        return np.ones(n, dtype=bool)
    return index.cpu().numpy() == bag.slide_ids.index(slide_id)


def attention_heatmaps(model, record: Mapping, cohort, slide: str, out: str | Path, *,
                       slide_file: str | Path | None = None, top_k: int = 0,
                       geojson: str | Path | None = None) -> HeatmapResult:
    """Run a fold's trained model on the bag holding one slide and draw its attention maps (PNG and PDF).

    Parameters
    ----------
    model : nn.Module
        The fold's trained model (``record``'s weights), in eval mode.
    record : dict
        The fold's record (method, cohort, fold).
    cohort : CohortData
        The cohort the model was trained on.
    slide : str
        Slide id (or sample id); the model runs on the whole bag holding it (all slides of the patient in a
        patient-level cell) and the maps are drawn for this slide's patches.
    out : path
        Output folder.
    slide_file : path, optional
        The slide's image: the maps are drawn over its thumbnail (:mod:`benchmark.analysis.heatmaps`) instead
        of on the patch grid.
    top_k : int
        With ``slide_file``: save the ``top_k`` highest- and lowest-attention patches of every map under
        ``<figure stem>_top/``.
    geojson : path, optional
        Also write the maps as QuPath-readable GeoJSON to this file.

    Returns
    -------
    HeatmapResult
    """
    if top_k and slide_file is None:
        raise ValueError("--top-k: patch images are read from the slide; give --slide-file (or --slide-dir)")
    sample_id = sample_of_slide(cohort.samples, slide)
    slide_ids = tuple(cohort.samples.loc[sample_id, "slide_ids"])
    slide_id = slide if slide in slide_ids else slide_ids[0]
    image = open_slide(slide_file) if slide_file is not None else None  # bad slide: fail before the model runs
    try:
        maps, sample = _attention_maps(model, record, cohort, sample_id, slide_id)
        result = HeatmapResult(str(record["method"]), str(record["cohort"]), int(record["fold"]), slide_id, sample,
                               maps)
        _add_tissue_and_signal(result, cohort, sample_id, slide_id)
        for pm in maps:
            if pm.magnification in result.signal:
                result.overlap[pm.name] = attention_signal_overlap(pm.values,
                                                                   result.signal[pm.magnification].values > 0)
        result.geometry = {m: patch_geometry(cohort.feature_folders, cohort.layout, cohort.backbone, slide_id, m,
                                             cohort.feature_root, image) for m in {pm.magnification for pm in maps}}
        stem = figure_stem(out, "heatmap", result.method, result.cohort, slide_id, f"fold{result.fold}")
        result.files = _draw_on_slide(result, image, stem, top_k) if image is not None \
            else _save(heatmap_figure(result), stem)
    finally:
        if image is not None:
            image.close()
    if geojson is not None:
        result.files.append(write_geojson(geojson, maps, result.geometry, slide_id))
    return result


def _draw_on_slide(result: HeatmapResult, image, stem: Path, top_k: int) -> list[Path]:
    """The slide figure (and the top patches) of a result; checks first that the maps lie on the slide."""
    result.overlay = slide_overlay(result.maps, image, result.geometry)
    titles = {pm.name: panel_title(pm.name, pm.magnification, result.overlap.get(pm.name)) for pm in result.maps}
    files = _save(slide_figure(result.overlay, result.maps, titles, _suptitle(result)), stem)
    if top_k:
        folder = stem.with_name(stem.name + "_top")
        result.overlay.top_patches = top_patches(image, result.maps, result.geometry, top_k, folder)
        files.append(folder / "index.csv")
    return files


def _attention_maps(model, record: Mapping, cohort, sample_id: str, slide_id: str) -> tuple[list[PatchMap], str]:
    """Every attention map of the model on the sample's bag, restricted to the slide's patches."""


    if hasattr(model, "return_attention"):  # CrossFusion computes its maps on request only on huge bags
        model.return_attention = True
    needs = dataclasses.replace(get_method_spec(str(record["method"])).needs, coords=True)
    bag = cohort.bag(sample_id, needs)
    model.eval()
    with torch.no_grad():
        output = model(bag)
    if not output.attention:
        raise ValueError(f"method {record['method']!r} returns no attention maps; nothing to draw")
    maps: list[PatchMap] = []
    for name in _ordered(list(output.attention)):
        amap = output.attention[name]
        m = int(amap.magnification)
        if m not in bag.coords:
            raise ValueError(f"{name}: no coordinates at {m}x in the bag of {sample_id}")
        rows = _slide_rows(bag, m, slide_id)
        scores = amap.scores.detach().float().cpu().numpy().reshape(-1)
        if len(scores) != len(rows):
            raise ValueError(f"{name}: {len(scores)} scores for {len(rows)} patches at {m}x (contract: aligned rows)")
        maps.append(PatchMap(name, m, bag.coords[m].cpu().numpy()[rows], scores[rows]))
    return maps, sample_id


def _add_tissue_and_signal(result: HeatmapResult, cohort, sample_id: str, slide_id: str) -> None:
    """Tissue types per magnification (from the cohort's tissue-type files) and the tumour fraction of each
    patch's area, computed from the 20x types; nothing when the cohort has no tissue types."""

    mags = sorted({pm.magnification for pm in result.maps} | {20})
    for m in mags:
        bag = cohort.bag(sample_id, Needs(magnifications=(m,), coords=True, tissue_types=True, graph_magnification=m))
        if bag.tissue_type is None:  # no tissue-type file (real data without one): draw the maps only
            result.tissue.clear()
            return
        rows = _slide_rows(bag, m, slide_id)
        result.tissue[m] = PatchMap("tissue", m, bag.coords[m].cpu().numpy()[rows], bag.tissue_type.cpu().numpy()[rows])
    t20 = result.tissue[20]
    step20 = grid_step(t20.coords) if len(t20.coords) > 1 else float(level0_patch_size(20))
    for m, t in result.tissue.items():
        step = step20 * (20 // m) if 20 % m == 0 else grid_step(t.coords)
        result.signal[m] = PatchMap("tumour fraction", m, t.coords,
                                    tumour_fraction(t.coords, step, t20.coords, t20.values))


def heatmap_figure(result: HeatmapResult) -> plt.Figure:
    """The maps on the patch grid (no slide image), with the tissue types and planted signal when known."""
    panels = len(result.maps) + (2 if result.tissue else 0)
    ncols = min(4, panels)
    nrows = -(-panels // ncols)
    # constrained layout and wrapped titles: a title never runs into its neighbour's
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.6 * nrows), squeeze=False, layout="constrained")
    layers = [pm.coords for pm in result.maps] + [t.coords for t in result.tissue.values()]
    lows = np.stack([c.min(0) for c in layers])
    highs = np.stack([c.max(0) + grid_step(c) for c in layers])  # right/bottom edge of the last patch
    extent = (lows[:, 0].min(), lows[:, 1].min(), highs[:, 0].max(), highs[:, 1].max())
    flat = list(axes.flat)
    for ax, pm in zip(flat, result.maps):
        artist = draw_patch_map(ax, pm.coords, percentile_rank(pm.values), grid_step(pm.coords), extent, vmin=0, vmax=1)
        ax.set_title(panel_title(pm.name, pm.magnification, result.overlap.get(pm.name)), fontsize=8)
        fig.colorbar(artist, ax=ax, fraction=0.046, pad=0.02, label="attention percentile")
    used = len(result.maps)
    if result.tissue:
        m_t = min(result.tissue)  # tissue types drawn at 20x (their own resolution); the signal at the coarsest
        t = result.tissue[20]
        draw_patch_map(flat[used], t.coords, t.values, grid_step(t.coords), extent, categorical=True)
        flat[used].set_title("tissue types (20x)", fontsize=8)

        flat[used].legend(handles=[Patch(color=c, label=n) for c, n in zip(TISSUE_COLORS, TISSUE_NAMES)],
                          loc="upper right", fontsize=6, framealpha=0.8)
        s = result.signal[m_t]
        artist = draw_patch_map(flat[used + 1], s.coords, s.values, grid_step(s.coords), extent, cmap="Greens",
                                vmin=0, vmax=1)
        flat[used + 1].set_title(f"planted signal: tumour fraction ({m_t}x)", fontsize=8)
        fig.colorbar(artist, ax=flat[used + 1], fraction=0.046, pad=0.02)
        used += 2
    for ax in flat[used:]:
        ax.axis("off")
    fig.suptitle(_suptitle(result), fontsize=11)
    return fig


def _suptitle(result: HeatmapResult) -> str:
    return f"{result.method} on {result.cohort.upper()} slide {result.slide_id} (fold {result.fold} model)"


# -------------------------------------------------------------------------------------------------------
# tuning (``plot tuning``)
# -------------------------------------------------------------------------------------------------------
def plot_tuning(study, stem: Path) -> list[Path]:
    """Optimisation history (inner C-index per trial, best so far) and parameter importances (fANOVA) of one
    study, side by side, with Optuna's matplotlib visualisation; PNG + PDF at ``stem``.

    The importances need at least two complete trials; with fewer, that panel says so.
    """
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # the matplotlib backend is marked experimental
        history = optuna_plots.plot_optimization_history(study, target_name="inner C-index")
        figures = [history.figure]
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
            figures.append(optuna_plots.plot_param_importances(study).figure)
    paths = []
    for figure, suffix in zip(figures, ("history", "importances")):
        figure.suptitle(study.study_name, fontsize=8)
        paths += _save(figure, stem.with_name(f"{stem.name}_{suffix}"))
    return paths

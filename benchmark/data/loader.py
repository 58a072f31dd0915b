"""The data contract: :func:`load_cohort` -> :class:`CohortData` (samples, folds, bins, cached bags).

Every method sees exactly the same samples, labels, folds and features::

    cohort = load_cohort("blca", data_root=None, backbone="resnet50", unit="patient")
    cohort.samples   # DataFrame indexed by sample_id: patient_id, slide_ids, time, event, censorship
    cohort.folds     # list[Fold]; Fold.train / Fold.val are lists of sample_id
    cohort.bag(sample_id, needs)          # -> Bag, cached in-process
    cohort.bins(fold, rule="train")       # -> (edges, Series of bins indexed by sample_id)

A *data root* holds one folder per cohort (``<root>/<cohort>/``: ``clinical.csv``, ``splits/``, features in
one of the layouts of :mod:`benchmark.data.features`, optional ``tissue_types/`` and, for synthetic data,
``truth/``). ``data_root=None`` means the embedded synthetic cohorts (``demo`` preset, seed 0).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmark.data.backbones import Backbone, get_backbone
from benchmark.data.bag import MAGNIFICATIONS, Bag, Needs
from benchmark.data.clinical import patient_table, read_clinical
from benchmark.data.cohorts import Cohort, get_cohort
from benchmark.data.features import LAYOUTS, detect_layout, feature_path, read_slide, read_tissue_types
from benchmark.data.graphs import build_graph
from benchmark.data.labels import RULES, assign_bins, quantile_edges
from benchmark.data.splits import read_splits, split_files, stratified_patient_folds, write_splits

UNITS = ("patient", "slide")
#: In-process bag cache budget (GiB), overridable with $MIL_BENCHMARK_CACHE_GB.
DEFAULT_CACHE_GB = 16.0


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: lists of sample IDs (patients, or slides with ``unit="slide"``)."""

    k: int
    train: list[str]
    val: list[str]


def map_split_ids(
    ids: list[str], samples: pd.DataFrame, slides: pd.DataFrame, unit: str = "patient"
) -> tuple[list[str], list[str]]:
    """Split-file IDs -> sample IDs (order kept, no repeats), and the IDs found nowhere in the table.

    An ID may be a patient ID (MCAT: every slide of the patient), a ``case_id`` or a slide ID (CrossFusion
    COAD lists slide barcodes: that slide only).
    """
    slide_unit = unit == "slide"
    patient_samples = samples.groupby("patient_id", sort=False).groups
    slide_to_patient = dict(zip(slides["slide_id"], slides["patient_id"]))
    case_to_slides = slides.groupby("case_id", sort=False)["slide_id"].agg(list).to_dict()
    out: dict[str, None] = {}
    missing = []
    for i in ids:
        if i in patient_samples:
            chosen = list(patient_samples[i])
        elif i in case_to_slides or i in slide_to_patient:
            chosen = [s if slide_unit else slide_to_patient[s] for s in case_to_slides.get(i, [i])]
        else:
            missing.append(i)
            continue
        out.update(dict.fromkeys(chosen))
    return list(out), missing


class CohortData:
    """One cohort x backbone x unit: labels, folds and a bag cache. Build it with :func:`load_cohort`."""

    def __init__(
        self,
        *,
        cohort: Cohort,
        backbone: Backbone,
        unit: str,
        slides: pd.DataFrame,
        samples: pd.DataFrame,
        folds: list[Fold],
        feature_root: Path,
        layout: str,
        provenance: dict,
        truth: pd.DataFrame | None,
        bin_rule: str,
    ) -> None:
        self.name = cohort.name
        self.cohort = cohort
        self.backbone = backbone
        self.unit = unit
        self.slides = slides
        self.samples = samples
        self.folds = folds
        self.in_dim = backbone.dim
        self.feature_root = feature_root
        self.layout = layout
        self.provenance = provenance
        self.truth = truth
        self.bin_rule = bin_rule
        self._bags: OrderedDict[tuple, Bag] = OrderedDict()
        self._bag_bytes: dict[tuple, int] = {}
        self._cache_budget = float(os.environ.get("MIL_BENCHMARK_CACHE_GB", DEFAULT_CACHE_GB)) * 2**30
        self._graphs: dict[tuple, np.ndarray] = {}

    def __repr__(self) -> str:
        return (f"CohortData({self.name!r}, backbone={self.backbone.name!r}, unit={self.unit!r}, "
                f"samples={len(self.samples)}, folds={len(self.folds)}, layout={self.layout!r})")

    # ------------------------------------------------------------------ labels
    def bins(self, fold: Fold | int, rule: str | None = None, n_bins: int = 4) -> tuple[np.ndarray, pd.Series]:
        """Discrete-time bins of every sample (see :mod:`benchmark.data.labels`).

        Parameters
        ----------
        fold : the fold (or its index) whose training samples fit the edges for ``rule="train"``
        rule : ``"train"``, ``"cohort"`` (MCAT) or ``"cohort-slides"`` (CrossFusion); default: ``bin_rule``
        n_bins : number of bins

        Returns
        -------
        edges : (n_bins + 1,) ndarray
        bins : Series of int64 indexed by sample_id (every sample, train and val)
        """
        rule = rule or self.bin_rule
        if rule not in RULES:
            raise ValueError(f"unknown bin rule {rule!r}; known: {', '.join(RULES)}")
        if isinstance(fold, int):
            fold = self.folds[fold]
        if rule == "train":
            fit = self.samples.loc[fold.train].drop_duplicates("patient_id")
            edges = quantile_edges(fit["time"], fit["event"], n_bins, source=f"{self.name} fold {fold.k} train")
        elif rule == "cohort":
            fit = self.samples.drop_duplicates("patient_id")
            edges = quantile_edges(fit["time"], fit["event"], n_bins, source=self.name)
        else:
            edges = quantile_edges(self.slides["time"], self.slides["event"], n_bins, source=self.name)
        return edges, pd.Series(assign_bins(self.samples["time"], edges), index=self.samples.index, name="bin")

    @property
    def oracle_c_index(self) -> float | None:
        """C-index of the true risk (synthetic cohorts only)."""
        return None if self.truth is None else self.truth.attrs.get("oracle_c_index")

    # ------------------------------------------------------------------ bags
    def _slide_graph(self, slide: str, kind: str, mag: int, k: int, feats: np.ndarray, coords: np.ndarray | None):
        key = (slide, kind, mag, k)
        edges = self._graphs.get(key)
        if edges is None:
            points = coords if kind == "spatial" else feats
            edges = build_graph(points, np.zeros(len(points), dtype=np.int64), k=k).numpy()
            self._graphs[key] = edges
        return edges

    def bag(self, sample_id: str, needs: Needs = Needs()) -> Bag:
        """The bag of one sample with exactly what ``needs`` asks for (read once, then served from memory).

        ``features`` holds every magnification in ``needs.magnifications`` (plus ``graph_magnification`` when
        a graph or tissue types are requested); ``slide_index`` always; ``coords`` when ``needs.coords``;
        ``edge_index[kind]`` for each requested graph (built per slide at ``graph_magnification`` with
        ``graph_k`` neighbours, cached per slide); ``tissue_type`` when requested and a tissue-type file exists.
        """
        key = (sample_id, needs)
        bag = self._bags.get(key)
        if bag is not None:
            self._bags.move_to_end(key)
            return bag
        try:
            slide_ids = self.samples.at[sample_id, "slide_ids"]
        except KeyError:
            raise KeyError(f"unknown sample {sample_id!r} in cohort {self.name!r}") from None
        gmag = needs.graph_magnification
        mags = tuple(sorted(set(needs.magnifications) | ({gmag} if (needs.graph or needs.tissue_types) else set())))
        want_coords = needs.coords or "spatial" in needs.graph
        per_slide = [read_slide(self.feature_root, self.layout, self.backbone, s, mags, want_coords) for s in slide_ids]
        features, coords, slide_index = {}, {}, {}
        for m in mags:
            features[m] = torch.from_numpy(np.concatenate([p[m][0] for p in per_slide]) if len(per_slide) > 1
                                           else per_slide[0][m][0])
            slide_index[m] = torch.from_numpy(
                np.concatenate([np.full(len(p[m][0]), i, dtype=np.int64) for i, p in enumerate(per_slide)]))
            if needs.coords:
                coords[m] = torch.from_numpy(np.concatenate([p[m][1] for p in per_slide]))
        edge_index = {}
        for kind in needs.graph:
            parts, offset = [], 0
            for s, p in zip(slide_ids, per_slide):
                feats, crd = p[gmag]
                parts.append(self._slide_graph(s, kind, gmag, needs.graph_k, feats, crd) + offset)
                offset += len(feats)
            edge_index[kind] = torch.from_numpy(np.concatenate(parts, axis=1))
        tissue = None
        if needs.tissue_types:
            types = []
            for s, p in zip(slide_ids, per_slide):
                t = read_tissue_types(self.feature_root, s)
                if t is None or gmag not in t:
                    types = None
                    break
                if len(t[gmag]) != len(p[gmag][0]):
                    raise ValueError(f"{self.feature_root / 'tissue_types' / (s + '.csv')}: {len(t[gmag])} "
                                     f"tissue types at {gmag}x for {len(p[gmag][0])} patches")
                types.append(t[gmag])
            tissue = None if types is None else torch.from_numpy(np.concatenate(types))
        source = None if tissue is None else "synthetic-truth" if self.provenance.get("synthetic") else "file"
        bag = Bag(sample_id=sample_id, slide_ids=tuple(slide_ids), features=features, coords=coords,
                  slide_index=slide_index, edge_index=edge_index, tissue_type=tissue, tissue_source=source)
        self._remember(key, bag)
        return bag

    def _remember(self, key: tuple, bag: Bag) -> None:
        size = sum(t.numel() * t.element_size() for d in (bag.features, bag.coords, bag.slide_index, bag.edge_index)
                   for t in d.values())
        self._bags[key] = bag
        self._bag_bytes[key] = size
        total = sum(self._bag_bytes.values())
        while total > self._cache_budget and len(self._bags) > 1:
            old, _ = self._bags.popitem(last=False)
            total -= self._bag_bytes.pop(old)

    def clear_cache(self) -> None:
        self._bags.clear()
        self._bag_bytes.clear()
        self._graphs.clear()


def _cohort_dir(root: Path, cohort: Cohort) -> Path:
    sub = root / cohort.name
    return sub if sub.is_dir() else root


def _writable_splits_dir(preferred: Path, clinical: Path) -> Path:
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        probe = preferred / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return preferred
    except OSError:
        digest = hashlib.sha1(str(clinical.resolve()).encode()).hexdigest()[:10]
        return Path(__file__).resolve().parents[2] / "data_cache" / "splits" / f"{clinical.stem}-{digest}"


def load_cohort(
    dataset: str,
    *,
    data_root: str | os.PathLike | None = None,
    backbone: str = "resnet50",
    unit: str = "patient",
    clinical: str | os.PathLike | None = None,
    splits: str | os.PathLike | None = None,
    layout: str = "auto",
    bin_rule: str = "train",
    check_features: bool = True,
    n_folds: int = 5,
    split_seed: int = 0,
) -> CohortData:
    """Load one cohort: clinical table, folds, feature source (see the module docstring).

    Parameters
    ----------
    dataset : cohort name (``blca, brca, coad, gbmlgg, luad, ucec`` or one added in ``datasets/*.toml``)
    data_root : root holding ``<cohort>/`` folders (or the cohort folder itself); None = synthetic ``demo``
    backbone : backbone name (``resnet50``, ``resnet50-full``, ``conch``, ...)
    unit : ``"patient"`` (a patient's slides form one bag; default) or ``"slide"``
    clinical : clinical table (default ``<cohort dir>/clinical.csv``)
    splits : folder of ``splits_{k}.csv`` (default ``<cohort dir>/splits``; generated there, stratified
        by event and time bin with ``split_seed``, when it holds none)
    layout : feature layout, ``"auto"`` or one of ``default, trident, clam, crossfusion``
    bin_rule : default rule of :meth:`CohortData.bins`
    check_features : verify that every slide of the table has a feature file (fails naming the first)

    Raises
    ------
    FileNotFoundError, ValueError, KeyError (unknown names, with a did-you-mean hint)
    """
    cohort = get_cohort(dataset)
    bb = get_backbone(backbone)
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if bin_rule not in RULES:
        raise ValueError(f"unknown bin rule {bin_rule!r}; known: {', '.join(RULES)}")
    synthetic = None
    if data_root is None:
        from benchmark.data.synth import ensure_synthetic

        root = ensure_synthetic("demo", seed=0, signal="mixed", cohorts=(cohort.name,), backbones=(bb.name,))
    else:
        root = Path(data_root)
        if not root.exists():
            raise FileNotFoundError(f"data root {root} does not exist")
    cdir = _cohort_dir(root, cohort)
    meta = root / "SYNTHETIC.json"
    if meta.exists():
        import json

        synthetic = json.loads(meta.read_text())

    clinical_path = Path(clinical) if clinical else cdir / "clinical.csv"
    if not clinical_path.exists():
        raise FileNotFoundError(f"clinical table {clinical_path} does not exist (cohort {cohort.name!r}, "
                                f"data root {root}); pass clinical=... or put clinical.csv in {cdir}")
    slides = read_clinical(clinical_path)
    patients = patient_table(slides, source=clinical_path)
    if unit == "patient":
        samples = patients.rename_axis("sample_id").assign(patient_id=patients.index)
    else:
        samples = slides.set_index("slide_id", drop=False).rename_axis("sample_id")
        samples = samples.assign(slide_ids=[(s,) for s in samples["slide_id"]])
    samples = samples[["patient_id", "slide_ids", "time", "event", "censorship"]]

    # folds
    split_dir = Path(splits) if splits else cdir / "splits"
    generated = False
    if splits and not split_files(split_dir):
        raise FileNotFoundError(f"no splits_{{k}}.csv files in {split_dir}")
    if not split_files(split_dir):
        split_dir = _writable_splits_dir(split_dir, clinical_path)
        if not split_files(split_dir):
            write_splits(split_dir, stratified_patient_folds(patients[["time", "event"]], n_folds, split_seed))
            generated = True
    raw = read_splits(split_dir)
    folds, missing_ids = [], []
    for k, (tr, va) in enumerate(raw):
        train, miss_t = map_split_ids(tr, samples, slides, unit)
        val, miss_v = map_split_ids(va, samples, slides, unit)
        missing_ids += miss_t + miss_v
        both = set(train) & set(val)
        if both:
            raise ValueError(f"{split_dir}/splits_{k}.csv: {len(both)} sample(s) in both train and val "
                             f"(patient leak), e.g. {sorted(both)[:3]}")
        folds.append(Fold(k, train, val))
    missing_ids = sorted(set(missing_ids))
    if missing_ids:
        warnings.warn(f"{split_dir}: {len(missing_ids)} split ID(s) are not in {clinical_path} and are dropped, "
                      f"e.g. {missing_ids[:3]} (run `python -m benchmark audit`)", stacklevel=2)

    # features
    slide_list = slides["slide_id"].tolist()
    if layout == "auto":
        layout = detect_layout(cdir, bb, slide_list, 20)
    elif layout not in LAYOUTS:
        raise ValueError(f"unknown feature layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")
    if check_features:
        absent = [s for s in slide_list if not feature_path(cdir, layout, bb, s, 20).exists()]
        if absent:
            raise FileNotFoundError(
                f"{clinical_path}: {len(absent)} slide(s) in the table have no {bb.name} feature file, e.g. slide "
                f"{absent[0]!r}: expected {feature_path(cdir, layout, bb, absent[0], 20)} ({layout} layout)"
            )

    truth = None
    from benchmark.data.synth import read_truth

    found = read_truth(cdir)
    if found is not None:
        tp, summary = found
        cols = ["risk", "risk_fine", "risk_coarse", "risk_cross"]
        truth = tp.loc[samples["patient_id"], cols].set_axis(samples.index)
        truth.attrs.update(oracle_c_index=summary["oracle_c_index"],
                           oracle_c_index_per_fold=summary["oracle_c_index_per_fold"], summary=summary)
    provenance = {
        "dataset": cohort.name,
        "backbone": bb.name,
        "unit": unit,
        "data_root": str(Path(root).resolve()),
        "cohort_dir": str(cdir.resolve()),
        "clinical": str(clinical_path.resolve()),
        "splits": str(split_dir.resolve()),
        "splits_generated": generated,
        "layout": layout,
        "synthetic": None if synthetic is None else {k: synthetic.get(k) for k in ("preset", "seed", "signal", "schema")},
        "missing_split_ids": missing_ids,
        "magnifications": list(MAGNIFICATIONS),
    }
    return CohortData(cohort=cohort, backbone=bb, unit=unit, slides=slides, samples=samples, folds=folds,
                      feature_root=cdir, layout=layout, provenance=provenance, truth=truth, bin_rule=bin_rule)

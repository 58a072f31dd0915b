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

from benchmark.choices import MISSING_FEATURES, UNITS
from benchmark.data.bag import MAGNIFICATIONS, Bag, Needs
from benchmark.data.clinical import ColumnMap, parse_columns, patient_table, read_clinical
from benchmark.data.cohorts import Backbone, Cohort, backbone_names, check_dim, get_backbone, get_cohort
from benchmark.data.features import (
    ANY_MAGNIFICATION, LAYOUTS, FeatureFolders, count_feature_files, detect_layout, expected_feature_file,
    feature_dim, find_feature_file, read_slide, read_tissue_types,
)
from benchmark.data.graphs import build_graph
from benchmark.data.labels import RULES, assign_bins, quantile_edges
from benchmark.data.paths import data_cache_dir
from benchmark.data.splits import (
    describe_origin, read_splits, read_splits_info, split_files, stratified_patient_folds, write_splits,
)

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
        feature_folders: FeatureFolders | None = None,
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
        self.feature_folders = feature_folders or {ANY_MAGNIFICATION: Path(feature_root)}
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
        source = f"cohort {self.name!r} fold {fold.k}" + (" (training samples)" if rule == "train" else f" ({rule} rule)")
        if rule == "train":
            fit = self.samples.loc[fold.train].drop_duplicates("patient_id")
            edges = quantile_edges(fit["time"], fit["event"], n_bins, source=source)
        elif rule == "cohort":
            fit = self.samples.drop_duplicates("patient_id")
            edges = quantile_edges(fit["time"], fit["event"], n_bins, source=source)
        else:
            edges = quantile_edges(self.slides["time"], self.slides["event"], n_bins, source=source)
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
        per_slide = [read_slide(self.feature_root, self.layout, self.backbone, s, mags, want_coords, self.feature_folders)
                     for s in slide_ids]
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
        return _splits_cache_dir(clinical)


def parse_feature_folders(spec: str | os.PathLike | dict | list | tuple | None) -> FeatureFolders | None:
    """``--features`` values -> ``{magnification or None: folder}``.

    Accepts ``"DIR"`` (one folder, see :mod:`benchmark.data.features`), ``["20x=DIR", "10x=DIR"]``, a dict
    ``{"20x": DIR}`` / ``{20: DIR}`` (experiment files) or None (the cohort folder of the data root).
    """
    if spec is None or spec == [] or spec == ():
        return None
    if isinstance(spec, (str, os.PathLike)):
        spec = [spec]
    items = list(spec.items()) if isinstance(spec, dict) else [_split_feature_item(str(x)) for x in spec]
    folders: FeatureFolders = {}
    for key, folder in items:
        mag = _magnification_key(key)
        if mag in folders:
            raise ValueError(f"--features: {key or 'a folder without magnification'} is given twice")
        folders[mag] = Path(folder)
    if ANY_MAGNIFICATION in folders and len(folders) > 1:
        raise ValueError("--features: give either one folder or one folder per magnification (20x=DIR 10x=DIR ...)")
    for mag, folder in folders.items():
        if not folder.is_dir():
            what = "does not exist" if not folder.exists() else "is not a directory"
            raise FileNotFoundError(f"--features {folder}: {what}")
    return folders


def _split_feature_item(text: str) -> tuple[str | None, str]:
    key, sep, folder = text.partition("=")
    if sep and key.strip().lower().rstrip("x").isdigit():
        return key.strip(), folder
    return None, text


def _magnification_key(key) -> int | None:
    if key is None:
        return ANY_MAGNIFICATION
    text = str(key).strip().lower().rstrip("x")
    if not text.isdigit() or int(text) not in MAGNIFICATIONS:
        raise ValueError(f"--features {key}=...: magnification must be one of "
                         f"{', '.join(f'{m}x' for m in MAGNIFICATIONS)}")
    return int(text)


def _resolve_root(data_root, cohort: Cohort, bb: Backbone, clinical=None) -> tuple[Path, dict | None]:
    """The data root and the facts of its synthetic marker (None for real data). Without a data root it is the
    embedded synthetic one, unless a clinical table is given apart (then the table's folder)."""
    if data_root is None and clinical is not None:
        return Path(clinical).parent, None
    if data_root is None:
        from benchmark.data.synth import ensure_synthetic

        root = ensure_synthetic("demo", seed=0, signal="mixed", cohorts=(cohort.name,), backbones=(bb.name,))
    else:
        root = Path(data_root)
        if not root.is_dir():
            what = "does not exist" if not root.exists() else "is not a directory"
            raise FileNotFoundError(f"--data-root {root}: {what}")
    meta = root / "SYNTHETIC.json"
    if not meta.exists():
        return root, None
    import json

    marker = json.loads(meta.read_text())
    return root, {k: marker.get(k) for k in ("preset", "seed", "signal", "schema")}


def _samples_of(slides: pd.DataFrame, unit: str, source: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(patients, samples)`` of a slide table for ``unit``."""
    patients = patient_table(slides, source=source)
    if unit == "patient":
        samples = patients.rename_axis("sample_id").assign(patient_id=patients.index)
    else:
        samples = slides.set_index("slide_id", drop=False).rename_axis("sample_id")
        samples = samples.assign(slide_ids=[(s,) for s in samples["slide_id"]])
    return patients, samples[["patient_id", "slide_ids", "time", "event", "censorship"]]


def _splits_cache_dir(clinical: Path) -> Path:
    digest = hashlib.sha1(str(clinical.resolve()).encode()).hexdigest()[:10]
    return data_cache_dir("splits", f"{clinical.stem}-{digest}")


def _given_splits(splits) -> Path:
    split_dir = Path(splits)
    if not split_dir.is_dir():
        what = "does not exist" if not split_dir.exists() else "is not a directory"
        raise FileNotFoundError(f"--splits {split_dir}: {what}")
    if not split_files(split_dir):
        raise FileNotFoundError(f"--splits {split_dir}: no splits_{{k}}.csv files in this folder")
    return split_dir


def _split_folder(splits, cdir: Path, clinical_path: Path, patients: pd.DataFrame, n_folds: int, split_seed: int,
                  generate: str = "write") -> tuple[Path | None, list | None, dict]:
    """The split files to use: ``(folder, None, origin)``, or with ``generate="memory"`` and no split files
    ``(None, folds, origin)``. Without split files, stratified patient splits are generated (``"write"``: into
    ``<cohort dir>/splits``, else the data cache, with a ``splits_info.json`` naming ``benchmark run`` and the
    seed). ``origin`` holds ``generated`` (in this call), ``origin`` (one line) and ``info``."""
    if splits:
        split_dir = _given_splits(splits)
        info = read_splits_info(split_dir)
        return split_dir, None, {"generated": False, "origin": describe_origin(split_dir, True, info), "info": info}
    for candidate in (cdir / "splits", _splits_cache_dir(clinical_path)):
        if split_files(candidate):
            info = read_splits_info(candidate)
            return candidate, None, {"generated": False, "origin": describe_origin(candidate, False, info),
                                     "info": info}
    folds = stratified_patient_folds(patients[["time", "event"]], n_folds, split_seed)
    info = {"command": "benchmark run", "seed": split_seed, "n_folds": n_folds, "clinical": str(clinical_path)}
    if generate == "memory":
        info["command"] = "benchmark audit"
        return None, folds, {"generated": True, "origin": describe_origin(None, False, info), "info": info}
    split_dir = _writable_splits_dir(cdir / "splits", clinical_path)
    write_splits(split_dir, folds, info)
    origin = (f"generated now by `benchmark run` (seed {split_seed}, {n_folds} folds, patient-level, stratified by "
              f"event and time bin), written to {split_dir}")
    return split_dir, None, {"generated": True, "origin": origin, "info": info}


def _read_folds(split_dir: Path | None, samples: pd.DataFrame, slides: pd.DataFrame, unit: str,
                raw: list | None = None) -> tuple[list[Fold], list[str]]:
    """Folds of the split files (or of ``raw`` folds) mapped to sample IDs, and the split IDs the table lacks;
    a leak is an error."""
    folds, missing_ids = [], []
    source = split_dir if split_dir is not None else "generated splits"
    for k, (tr, va) in enumerate(raw if raw is not None else read_splits(split_dir)):
        train, miss_t = map_split_ids(tr, samples, slides, unit)
        val, miss_v = map_split_ids(va, samples, slides, unit)
        missing_ids += miss_t + miss_v
        both = set(train) & set(val)
        if both:
            raise ValueError(f"{source}/splits_{k}.csv: {len(both)} sample(s) in both train and val "
                             f"(patient leak), e.g. {sorted(both)[:3]}")
        folds.append(Fold(k, train, val))
    missing_ids = sorted(set(missing_ids))
    if missing_ids:
        warnings.warn(f"{source}: {len(missing_ids)} split ID(s) are not in the clinical table and are dropped, "
                      f"e.g. {missing_ids[:3]} (run `python -m benchmark audit`)", stacklevel=3)
    return folds, missing_ids


def _choose_layout(folders: FeatureFolders, layout: str, bb: Backbone, slide_list: list[str]) -> tuple[str, str]:
    """``(layout, how it was chosen)``; ``auto`` checks every slide of the table under every layout."""
    if layout == "auto":
        detection = detect_layout(folders, bb, slide_list, 20 if _serves(folders, 20) else min(k for k in folders))
        return detection.layout, detection.describe()
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout}: unknown feature layout; known: auto, {', '.join(LAYOUTS)}")
    return layout, f"{layout} layout (given)"


def _serves(folders: FeatureFolders, mag: int) -> bool:
    return mag in folders or ANY_MAGNIFICATION in folders


def _slides_without_features(folders: FeatureFolders, layout: str, bb: Backbone, slide_list: list[str]) -> dict[str, int]:
    """``{slide: first magnification without a file}`` over 20x and every magnification given a folder."""
    mags = sorted({m for m in folders if m is not None} | ({20} if ANY_MAGNIFICATION in folders else set()))
    absent: dict[str, int] = {}
    for m in mags:
        present = count_feature_files(folders, layout, bb, slide_list, m)
        absent.update({s: m for s in slide_list if s not in present and s not in absent})
    return absent


def _missing_features_error(absent: dict[str, int], n_slides: int, folders, layout, bb, clinical_path) -> FileNotFoundError:
    names = list(absent)
    first = names[0]
    expected = expected_feature_file(folders, layout, bb, first, absent[first])
    shown = ", ".join(repr(s) for s in names[:3]) + (", ..." if len(names) > 3 else "")
    return FileNotFoundError(
        f"{clinical_path}: {len(names)} slide(s) of the table's {n_slides} have no {bb.name} feature file "
        f"({layout} layout), e.g. slide {shown}; expected e.g. {expected}. Pass --missing-features drop to "
        "leave them out (the run reports what each fold loses)"
    )


def drop_report(folds_before: list[Fold], folds_after: list[Fold]) -> list[dict]:
    """Per fold: samples dropped from train and val for missing features, and the final sizes."""
    return [{"fold": a.k, "train_dropped": len(b.train) - len(a.train), "val_dropped": len(b.val) - len(a.val),
             "train": len(a.train), "val": len(a.val)} for b, a in zip(folds_before, folds_after)]


def _drop_missing(slides, samples, folds, absent: dict[str, int], unit: str, source: Path):
    """The table, samples and folds without the slides of ``absent`` (a patient goes when no slide is left)."""
    kept_slides = slides[~slides["slide_id"].isin(list(absent))].reset_index(drop=True)
    if kept_slides.empty:
        raise FileNotFoundError(f"{source}: no slide of the table has a feature file; nothing left to train on")
    _, kept = _samples_of(kept_slides, unit, source)
    keep = set(kept.index)
    new_folds = [Fold(f.k, [s for s in f.train if s in keep], [s for s in f.val if s in keep]) for f in folds]
    report = {"policy": "drop", "slides_dropped": len(absent), "examples": list(absent)[:5],
              "samples_dropped": len(samples) - len(kept), "folds": drop_report(folds, new_folds)}
    return kept_slides, kept, new_folds, report


def load_cohort(
    dataset: str, *, data_root: str | os.PathLike | None = None, backbone: str = "resnet50", unit: str = "patient",
    clinical: str | os.PathLike | None = None, splits: str | os.PathLike | None = None,
    features: str | os.PathLike | dict | list | None = None, layout: str = "auto", missing_features: str = "error",
    bin_rule: str = "train", check_features: bool = True, n_folds: int = 5, split_seed: int = 0,
    columns: str | dict | ColumnMap | None = None, generate_splits: str = "write", check_dims: bool = True,
) -> CohortData:
    """Load one cohort: clinical table, folds, feature source (see the module docstring).

    Parameters
    ----------
    dataset : cohort name (``blca, brca, coad, gbmlgg, luad, ucec`` or one declared in a registry file)
    data_root : root holding ``<cohort>/`` folders (or the cohort folder itself); None = synthetic ``demo``,
        unless ``clinical`` is given (then the table's folder is the cohort folder)
    backbone : backbone name (``resnet50``, ``resnet50-full``, ``conch``, ...)
    unit : ``"patient"`` (a patient's slides form one bag; default) or ``"slide"``
    clinical : clinical table, ``.csv`` or MCAT's ``.csv.zip`` (default ``<cohort dir>/clinical.csv``)
    splits : folder of ``splits_{k}.csv`` (default ``<cohort dir>/splits``; when it holds none, stratified splits
        are generated into it, or into ``$MIL_BENCHMARK_DATA/splits`` when it cannot be written)
    features : feature folders, see :func:`parse_feature_folders` (default: the cohort folder)
    layout : feature layout, ``"auto"`` (every slide checked) or one of ``default, trident, clam, crossfusion``
    missing_features : ``"error"`` (default) or ``"drop"`` slides without a feature file (reported per fold in
        ``provenance["missing_features"]``)
    bin_rule : default rule of :meth:`CohortData.bins`
    check_features : verify that every slide of the table has a feature file
    n_folds, split_seed : of the generated splits
    columns : the clinical table's column mapping (``--columns`` text or a mapping, see
        :func:`benchmark.data.clinical.parse_columns`); default: the cohort's ``[cohorts.<name>.columns]``, else
        the MCAT columns. Recorded in ``provenance["columns"]`` with its warnings.
    generate_splits : ``"write"`` (generated splits are written, see ``splits``) or ``"memory"`` (kept in memory,
        nothing written: ``audit``)
    check_dims : read every feature file's dim from its header before anything trains; a file whose dim is
        not the backbone's is an error naming the file and both dims

    Raises
    ------
    FileNotFoundError, ValueError, KeyError (unknown names, with a did-you-mean hint)
    """
    cohort, bb = get_cohort(dataset), get_backbone(backbone)
    for option, value, choices in (("--unit", unit, UNITS), ("--bin-rule", bin_rule, RULES),
                                   ("--missing-features", missing_features, MISSING_FEATURES)):
        _check_choice(option, value, choices)
    folders = parse_feature_folders(features)
    cmap = parse_columns(columns if columns is not None else (dict(cohort.columns) or None)) or ColumnMap()
    root, synthetic = _resolve_root(data_root, cohort, bb, clinical)
    cdir = _cohort_dir(root, cohort)
    clinical_path = _clinical_path(clinical, cdir, cohort)
    slides = read_clinical(clinical_path, columns=None if cmap.is_default else cmap)
    patients, samples = _samples_of(slides, unit, clinical_path)
    split_dir, raw, origin = _split_folder(splits, cdir, clinical_path, patients, n_folds, split_seed, generate_splits)
    folds, missing_ids = _read_folds(split_dir, samples, slides, unit, raw)
    folders = folders or {ANY_MAGNIFICATION: cdir}
    layout, layout_note = _choose_layout(folders, layout, bb, slides["slide_id"].tolist())
    absent = _slides_without_features(folders, layout, bb, slides["slide_id"].tolist()) if check_features else {}
    if absent and missing_features == "error":
        raise _missing_features_error(absent, len(slides), folders, layout, bb, clinical_path)
    if check_dims:
        check_feature_dims(folders, layout, bb, [s for s in slides["slide_id"] if s not in absent])
    slides, samples, folds, dropped = _drop_missing(slides, samples, folds, absent, unit, clinical_path) if absent \
        else (slides, samples, folds, None)
    provenance = {
        "dataset": cohort.name, "backbone": bb.name, "unit": unit, "data_root": str(Path(root).resolve()),
        "cohort_dir": str(cdir.resolve()), "clinical": str(clinical_path.resolve()),
        "splits": None if split_dir is None else str(split_dir.resolve()), "splits_generated": origin["generated"],
        "splits_origin": origin["origin"], "splits_info": origin["info"], "layout": layout,
        "layout_detection": layout_note, "columns": None if cmap.is_default else cmap.spec(),
        "column_mapping": cmap.describe(), "column_warnings": cmap.warnings(),
        "features": {("any" if m is None else f"{m}x"): str(Path(f).resolve()) for m, f in folders.items()},
        "synthetic": synthetic, "missing_split_ids": missing_ids, "missing_features": dropped,
        "magnifications": list(MAGNIFICATIONS), "sizes": fold_sizes(folds),
    }
    return CohortData(cohort=cohort, backbone=bb, unit=unit, slides=slides, samples=samples, folds=folds,
                      feature_root=cdir, layout=layout, feature_folders=folders, provenance=provenance,
                      truth=_truth_of(cdir, samples), bin_rule=bin_rule)


def fold_sizes(folds: list[Fold]) -> list[dict]:
    """Per fold, the numbers of training and validation samples (after any drop: what trains)."""
    return [{"fold": f.k, "train": len(f.train), "val": len(f.val)} for f in folds]


def _feature_files(folders: FeatureFolders, layout: str, bb: Backbone, slides: list[str]):
    """``(path, h5 group)`` of every feature file of ``slides`` at 20x and every magnification given a folder."""
    mags = sorted({m for m in folders if m is not None} | ({20} if ANY_MAGNIFICATION in folders else set()))
    for m in mags:
        for slide in slides:
            path = find_feature_file(folders, layout, bb, slide, m)
            if path.exists():
                yield path, f"{m}x" if layout == "default" else None


def check_feature_dims(folders: FeatureFolders, layout: str, bb: Backbone, slides: list[str]) -> int:
    """Every feature file's dim (read from its header) against the backbone's, before anything trains.

    Returns the number of files checked; the first file whose dim differs raises ValueError naming the file,
    its dim and the backbone's dim.
    """
    n = 0
    for path, group in _feature_files(folders, layout, bb, slides):
        check_dim(feature_dim(path, group), bb, f"{path}[{group}]" if group else path)
        n += 1
    return n


def _first_feature_file(folders: FeatureFolders) -> tuple[Path, str] | tuple[None, str]:
    """One feature file of the folders, and the folder names from the given folder down to it."""
    for folder in folders.values():
        for pattern in ("*.h5", "*.pt"):
            found = next((p for p in sorted(Path(folder).rglob(pattern)) if "coord" not in p.name.lower()), None)
            if found is not None:
                return found, f"{Path(folder).name}/{found.parent.relative_to(folder).as_posix()}".lower()
    return None, ""


def infer_backbone(features) -> tuple[str, str]:
    """The backbone of ``--features`` given without ``--backbone``: ``(name, how it was inferred)``.

    Inferred only when exactly one registered backbone has the files' dim (read from one file's header) and its
    name (or its TRIDENT name) appears in the feature folder's path; otherwise ValueError asks for
    ``--backbone``.
    """
    folders = parse_feature_folders(features)
    path, words = _first_feature_file(folders)
    if path is None:
        raise ValueError(f"--features {', '.join(str(f) for f in folders.values())}: no .h5 or .pt feature file "
                         "found; name the backbone with --backbone")
    dim = feature_dim(path)
    same_dim = [get_backbone(n) for n in backbone_names() if get_backbone(n).dim == dim]
    named = [b for b in same_dim if b.name in words or (b.trident and b.trident.lower() in words)]
    if len(named) == 1:
        return named[0].name, f"backbone {named[0].name} inferred from {path} ({dim}-d, folder named after it)"
    listed = ", ".join(b.name for b in same_dim) or "none (declare one in a registry file)"
    raise ValueError(f"--features given without --backbone: the feature files are {dim}-d (e.g. {path}); name "
                     f"their backbone with --backbone (registered {dim}-d backbones: {listed})")


def _clinical_path(clinical, cdir: Path, cohort: Cohort) -> Path:
    """The clinical table: ``clinical`` when given, else ``<cohort dir>/clinical.csv``; it must exist."""
    path = Path(clinical) if clinical else cdir / "clinical.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{'--clinical ' if clinical else ''}{path}: clinical table does not exist "
                                f"(cohort {cohort.name!r}); pass --clinical FILE or put clinical.csv in {cdir}")
    return path


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{option} {value}: must be one of {', '.join(choices)}")


def _truth_of(cdir: Path, samples: pd.DataFrame) -> pd.DataFrame | None:
    """The synthetic truth of the samples (None for real data)."""
    from benchmark.data.synth import read_truth

    found = read_truth(cdir)
    if found is None:
        return None
    tp, summary = found
    cols = ["risk", "risk_fine", "risk_coarse", "risk_cross"]
    truth = tp.loc[samples["patient_id"], cols].set_axis(samples.index)
    truth.attrs.update(oracle_c_index=summary["oracle_c_index"],
                       oracle_c_index_per_fold=summary["oracle_c_index_per_fold"], summary=summary)
    return truth

"""Synthetic cohorts: the embedded default data of the benchmark (see docs/DATA.md for the full model).

Every cohort mirrors its real table (patients, slides per patient, censoring rate, median follow-up) and is
written in the real formats (MCAT clinical table, MCAT split files, per-slide h5 / pt features at 5x, 10x
and 20x for each backbone at its true dim), so the harness reads it exactly as it reads real data.

Model, in short:

- **Tissue.** Each slide is an elliptical-ish tissue region on a 20x patch grid (a 20x patch is 512 px at level 0
  on a 40x scan); a 10x patch covers 2x2 20x cells (1024 px), a 5x patch 4x4 (2048 px), with consistent
  level-0 coordinates, so the three bags describe the same tissue. Tissue types (0 tumour, 1 stroma,
  2 lymphocytes, 3 necrosis, 4 other) form Voronoi regions; coarser patches see the type mix of their area.
- **Risk.** Per patient, independent states ``f, a ~ N(0, 1)`` and ``u, v ~ U(0, 1)``. Components
  ``r_fine = z(f)``, ``r_coarse = z(a)``, ``r_cross = z(cos(2 pi (u + v)))`` (z = z-scored over the cohort).
  Given ``v`` alone, ``u + v mod 1`` is still uniform, so ``r_cross`` is *independent* of ``v`` (and of ``u``):
  no function of one scale carries any information about it. (Data version 1-2 used ``(u - 1/2)(v - 1/2)``,
  uncorrelated with each scale but not independent: its spread grows with ``|v - 1/2|``, and ``|v - 1/2|``
  alone reached a C-index of 0.58 on BLCA.)
  ``risk = (w_f r_fine + w_c r_coarse + w_x r_cross) / ||w||``. The ``cross-xor`` control uses
  ``r_cross = z(sign(u - 1/2) sign(v - 1/2))`` instead (also independent of each scale, and easier to learn:
  see ``CROSS_FORMS``).
- **Where the states show.** ``f`` and ``v`` in the 20x features of tumour patches; ``a`` and ``u`` in the 5x
  features, weighted by the tumour fraction of the patch's area; 10x carries tissue type only. Each slide of a
  patient shows the patient's state plus a small slide-level jitter.
- **Features** of backbone b: ``mix @ prototypes_b + offset_{b,m} + amplitude * signal_b * state terms + slide
  offset + noise_b * N(0, I)``; state directions are orthogonal to the prototypes and offsets; ``signal_b`` and
  ``noise_b`` come from ``datasets/backbones.toml`` (domain-specific encoders express the morphology more strongly
  and more cleanly than ResNet50; data version 4 added ``signal_b``, because noise alone left every backbone
  saturated and the synthetic Table 2 flat).
- **Survival.** Weibull proportional hazards (shape 1.2) with log hazard ratio ``effect * risk``, independent
  uniform censoring tuned to the cohort's censoring rate, times rescaled to its median follow-up (months).

The true risk, its components, the states and the oracle C-index live in ``<cohort>/truth/`` (never read by
methods); per-patch tissue types in ``<cohort>/tissue_types/{m}x/`` (a format users may also provide).
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from sksurv.metrics import concordance_index_censored

from benchmark.data.cohorts import Backbone, Cohort, get_backbone, get_cohort, resolve_backbones, resolve_cohorts
from benchmark.data.features import LAYOUTS, H5SlideWriter, feature_path, level0_patch_size, write_slide, write_tissue_types
from benchmark.data.splits import stratified_patient_folds, write_splits
from benchmark import choices
from benchmark.naming import did_you_mean

SCHEMA = 4  # bump whenever the generative model changes: it names the cache folder, so old data is never reused
TISSUE_TYPES = ("tumour", "stroma", "lymphocytes", "necrosis", "other")
TISSUE_PROBS = np.array([0.45, 0.25, 0.12, 0.08, 0.10])
#: Risk-component weights (fine, coarse, cross) of each signal preset.
SIGNALS: dict[str, tuple[float, float, float]] = {
    "mixed": (1.0, 1.0, 1.0),
    "cross": (0.0, 0.0, 1.0),
    "fine": (1.0, 0.0, 0.0),
    "coarse": (0.0, 1.0, 0.0),
    "none": (0.0, 0.0, 0.0),
    "cross-xor": (0.0, 0.0, 1.0),
}
if tuple(SIGNALS) != choices.SIGNALS:  # the names users may pass are declared in benchmark.choices
    raise ImportError("benchmark.data.synth.SIGNALS must name exactly benchmark.choices.SIGNALS")
#: Form of the cross-scale component per signal preset (default "cos"). Both are independent of each scale.
#: "cos" = cos(2 pi (u + v)): four diagonal level lines, hard to learn from ~300 patients (a gradient-boosted
#: learner given the true u, v directions reaches C = 0.65 of an oracle 0.79 on demo BLCA); "xor" =
#: sign(u - 1/2) sign(v - 1/2): two axis-aligned thresholds, learnable in principle (the same learner: 0.73 of 0.75).
CROSS_FORMS = {
    "cos": lambda u, v: np.cos(2 * np.pi * (u + v)),
    "xor": lambda u, v: np.sign(u - 0.5) * np.sign(v - 0.5),
}
SIGNAL_CROSS_FORM: dict[str, str] = {"cross-xor": "xor"}
MAGS = (5, 10, 20)
WEIBULL_SHAPE = 1.2
SLIDE_JITTER = 0.25  # std of a slide's deviation from its patient's state
SLIDE_OFFSET = 0.3  # per-coordinate std of a slide's feature offset (staining / scanner batch)
FEATURE_BLOCK = 16384  # rows generated at a time for big slides (memory bound of the full preset)


@dataclass(frozen=True)
class Preset:
    """Size of a synthetic cohort. ``n_patients=None`` = the real cohort's patient and slide counts."""

    name: str
    n_patients: int | None
    mean_patches: float  # mean 20x patches per slide (lognormal)
    patches_sigma: float
    min_patches: int
    max_patches: int
    effect: float = 1.5  # log hazard ratio per SD of risk
    # Projection of one SD of a state on its feature direction. Measured on demo BLCA / resnet50 (AMIL, demo
    # recipe, 5 folds): 1.5 -> 0.529, 6 -> 0.546, 16 -> 0.582 (effect 1.0); a weak direction among 1024 noisy
    # ones is not found from ~300 patients, whereas real prognostic morphology is a major axis of variation.
    # Each backbone scales it by its ``synthetic_signal`` (uni2-h 1.0 down to resnet50 0.3; data v4).
    amplitude: float = 16.0


PRESETS: dict[str, Preset] = {
    # tests: 40 patients learn a method-agnostic signal only when it is strong (resnet50 plants 14.4, not 4.8)
    "tiny": Preset("tiny", 40, 20, 0.3, 6, 48, amplitude=48.0),
    "demo": Preset("demo", None, 52, 0.35, 12, 160),
    "full": Preset("full", None, 13496, 0.9, 256, 137990),
}


def _h(text: str) -> int:
    return zlib.crc32(text.encode())


def signal_weights(signal: str | tuple[float, float, float] | dict) -> tuple[str, tuple[float, float, float]]:
    """``(name, (w_fine, w_coarse, w_cross))`` of a signal preset name, a 3-tuple or a dict of weights."""
    if isinstance(signal, str):
        if signal not in SIGNALS:
            raise did_you_mean(signal, list(SIGNALS), "signal")
        return signal, SIGNALS[signal]
    if isinstance(signal, dict):
        signal = (signal.get("fine", 0.0), signal.get("coarse", 0.0), signal.get("cross", 0.0))
    w = tuple(float(x) for x in signal)
    if len(w) != 3 or min(w) < 0:
        raise ValueError(f"signal weights must be three non-negative numbers (fine, coarse, cross), got {signal}")
    return "custom-" + "-".join(f"{x:g}" for x in w), w  # type: ignore[return-value]


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


# ------------------------------------------------------------------------------------------ cohort plan

@dataclass
class CohortPlan:
    """Everything cohort-level (cheap; recomputed deterministically by every writer)."""

    cohort: Cohort
    preset: Preset
    seed: int
    signal: str
    weights: tuple[float, float, float]
    patients: pd.DataFrame  # index patient_id: time, event, censorship, risk*, f, a, u, v
    slides: pd.DataFrame  # slide_id, slide_file, patient_id, n_patches, f, a, u, v (slide-level states)

    def __post_init__(self) -> None:
        self._geometry: dict[int, "SlideGeometry"] = {}

    def geometry(self, slide_index: int) -> "SlideGeometry":
        """Tissue geometry of one slide; memoised except for big slides (the full preset stays one-slide lean)."""
        geo = self._geometry.get(slide_index)
        if geo is None:
            geo = slide_geometry(self, slide_index)
            if len(geo.coords[20]) <= FEATURE_BLOCK:
                self._geometry[slide_index] = geo
        return geo


def _survival(risk: np.ndarray, cohort: Cohort, effect: float, rng: np.random.Generator):
    n = len(risk)
    t_event = (rng.exponential(size=n) / np.exp(effect * risk)) ** (1.0 / WEIBULL_SHAPE)
    v = rng.uniform(size=n)
    lo, hi = -8.0, 8.0  # bisection on log L: censoring time L * V, censored fraction decreases in L
    for _ in range(60):
        mid = (lo + hi) / 2
        if (np.exp(mid) * v < t_event).mean() > cohort.censoring:
            lo = mid
        else:
            hi = mid
    c_time = np.exp(hi) * v
    observed = np.minimum(t_event, c_time)
    event = (t_event <= c_time).astype(int)
    observed = observed * (cohort.time_median / np.median(observed))
    return np.maximum(np.round(observed, 2), 0.01), event


def plan_cohort(cohort: Cohort, preset: Preset, seed: int, signal="mixed") -> CohortPlan:
    """Patients, slides, latent states, risk and survival of one synthetic cohort (deterministic)."""
    name, w = signal_weights(signal)
    rng = np.random.default_rng([seed, _h(cohort.name), 1])
    if cohort.patients < 1 or cohort.slides < cohort.patients or cohort.time_median <= 0:
        raise ValueError(f"{cohort.source_file or 'registry'}: cohort {cohort.name!r} declares no table facts "
                         "(patients, slides, events, censoring, time_median, time_max), so synthetic data cannot mirror "
                         "it; give its real data (--clinical, --features) or declare the facts")
    n = preset.n_patients or cohort.patients
    extra_ratio = cohort.slides / cohort.patients - 1
    n_slides = n + int(round(n * extra_ratio))
    pids = [f"SYN-{cohort.name.upper()}-{i:04d}" for i in range(n)]
    f, a = rng.standard_normal(n), rng.standard_normal(n)
    u, v = rng.uniform(size=n), rng.uniform(size=n)
    cross = CROSS_FORMS[SIGNAL_CROSS_FORM.get(name, "cos")](u, v)
    parts = np.stack([_zscore(f), _zscore(a), _zscore(cross)], axis=1)
    wv = np.asarray(w)
    risk = parts @ wv / np.linalg.norm(wv) if wv.any() else np.zeros(n)
    time, event = _survival(risk, cohort, preset.effect, rng)
    patients = pd.DataFrame(
        {"time": time, "event": event, "censorship": 1 - event, "risk": risk, "risk_fine": parts[:, 0],
         "risk_coarse": parts[:, 1], "risk_cross": parts[:, 2], "f": f, "a": a, "u": u, "v": v},
        index=pd.Index(pids, name="patient_id"),
    )
    per_patient = np.ones(n, dtype=int) + np.bincount(rng.integers(0, n, n_slides - n), minlength=n)
    owner = np.repeat(np.arange(n), per_patient)
    dx = np.concatenate([np.arange(1, k + 1) for k in per_patient])
    mu = np.log(preset.mean_patches) - preset.patches_sigma**2 / 2
    n_patches = np.clip(np.round(rng.lognormal(mu, preset.patches_sigma, len(owner))),
                        preset.min_patches, preset.max_patches).astype(int)
    jitter = rng.standard_normal((len(owner), 4)) * SLIDE_JITTER
    slides = pd.DataFrame(
        {
            "slide_id": [f"{pids[o]}-01Z-00-DX{d}" for o, d in zip(owner, dx)],
            "patient_id": [pids[o] for o in owner],
            "n_patches": n_patches,
            "f": f[owner] + jitter[:, 0],
            "a": a[owner] + jitter[:, 1],
            # u, v live on [0, 1]; jitter them on the unit-variance scale, then clip
            "u": np.clip(u[owner] + jitter[:, 2] / np.sqrt(12), 0, 1),
            "v": np.clip(v[owner] + jitter[:, 3] / np.sqrt(12), 0, 1),
        }
    )
    slides["slide_file"] = slides["slide_id"] + ".svs"
    return CohortPlan(cohort, preset, seed, name, w, patients, slides)


# ------------------------------------------------------------------------------------------ tissue

@dataclass
class SlideGeometry:
    """Patches of one slide at each magnification: level-0 coords (N_m, 2), type mix (N_m, 5), type (N_m,)."""

    coords: dict[int, np.ndarray]
    mix: dict[int, np.ndarray]
    types: dict[int, np.ndarray]


def slide_geometry(plan: CohortPlan, slide_index: int) -> SlideGeometry:
    """Tissue region and Voronoi tissue-type map of one slide, on the 20x grid, pooled to 10x and 5x."""
    rng = np.random.default_rng([plan.seed, _h(plan.cohort.name), 2, slide_index])
    target = int(plan.slides["n_patches"].iat[slide_index])
    aspect = rng.uniform(0.6, 1.6)
    h = max(1.0, np.sqrt(4 * target / (np.pi * aspect)))
    w = max(1.0, aspect * h)
    hi, wi = int(np.ceil(h)) + 2, int(np.ceil(w)) + 2
    yy, xx = np.mgrid[0:hi, 0:wi]
    cy, cx = (hi - 1) / 2, (wi - 1) / 2
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.12 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi))
    inside = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= wobble**2
    cells = np.argwhere(inside)  # (N, 2) row, col; row-major order
    if len(cells) == 0:
        cells = np.array([[0, 0]])
    n_seeds = int(np.clip(round(np.sqrt(len(cells)) / 1.5), 2, 60))
    seeds = cells[rng.choice(len(cells), size=min(n_seeds, len(cells)), replace=False)]
    seed_types = rng.choice(5, size=len(seeds), p=TISSUE_PROBS)
    seed_types[0] = 0  # every slide has tumour
    _, nearest = cKDTree(seeds + rng.uniform(-0.3, 0.3, seeds.shape)).query(cells)
    types20 = seed_types[np.atleast_1d(nearest)]
    origin = rng.integers(1, 20, size=2) * level0_patch_size(5)  # keeps the 5x grid aligned
    coords, mix, types = {}, {}, {}
    onehot = np.eye(5)[types20]
    for m in MAGS:
        f = 20 // m  # 20x cells per side of one patch at m
        keys = cells // f
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)  # sorted row-major
        counts = np.zeros((len(uniq), 5))
        np.add.at(counts, inverse.ravel(), onehot)
        mix[m] = counts / counts.sum(axis=1, keepdims=True)
        types[m] = mix[m].argmax(axis=1)
        # (x, y) level-0 top-left pixels
        coords[m] = (uniq[:, ::-1] * level0_patch_size(m) + origin).astype(np.int64)
    return SlideGeometry(coords, mix, types)


# ------------------------------------------------------------------------------------------ features

@dataclass
class _BackboneSpace:
    prototypes: np.ndarray  # (5, D)
    offsets: dict[int, np.ndarray]  # m -> (D,)
    directions: np.ndarray  # (4, D) unit: fine (20x), v (20x), coarse (5x), u (5x)


def _backbone_space(backbone: Backbone, seed: int) -> _BackboneSpace:
    rng = np.random.default_rng([seed, _h(backbone.name), 3])
    d = backbone.dim
    base = rng.standard_normal((d, 5 + 3 + 4))
    proto = base[:, :5].T.copy()
    offsets = {m: 0.5 * base[:, 5 + i] for i, m in enumerate(MAGS)}
    q, _ = np.linalg.qr(base)  # last 4 columns are orthogonal to prototypes and offsets
    return _BackboneSpace(proto.astype(np.float32), {m: o.astype(np.float32) for m, o in offsets.items()},
                          q[:, 8:12].T.astype(np.float32))


def _state_terms(plan: CohortPlan, slide_index: int, mag: int, mix: np.ndarray, space: _BackboneSpace,
                 backbone: Backbone) -> np.ndarray:
    """(N, D) planted state signal of one slide at ``mag``, scaled by the backbone's ``synthetic_signal``."""
    row = plan.slides.iloc[slide_index]
    amp = plan.preset.amplitude * backbone.synthetic_signal
    if mag == 20:
        weight = mix[:, 0:1]  # tumour patches (20x patches are pure)
        state = np.array([row["f"], (row["v"] - 0.5) * np.sqrt(12)], dtype=np.float32)
        return amp * weight * (state @ space.directions[0:2])[None, :]
    if mag == 5:
        weight = np.minimum(1.0, 2.0 * mix[:, 0:1])  # tumour fraction of the 5x area
        state = np.array([row["a"], (row["u"] - 0.5) * np.sqrt(12)], dtype=np.float32)
        return amp * weight * (state @ space.directions[2:4])[None, :]
    return np.zeros((mix.shape[0], space.directions.shape[1]), dtype=np.float32)


def _feature_blocks(plan, slide_index, mag, geo, space, backbone, rng) -> Iterable[tuple[int, np.ndarray]]:
    mix = geo.mix[mag].astype(np.float32)
    slide_offset = (SLIDE_OFFSET * rng.standard_normal(backbone.dim)).astype(np.float32)
    for start in range(0, mix.shape[0], FEATURE_BLOCK):
        part = mix[start : start + FEATURE_BLOCK]
        x = part @ space.prototypes + space.offsets[mag] + slide_offset
        x += _state_terms(plan, slide_index, mag, part, space, backbone)
        x += backbone.synthetic_noise * rng.standard_normal(x.shape, dtype=np.float32)
        yield start, x.astype(np.float32, copy=False)


def _write_big_slide(plan: CohortPlan, i: int, geo, space, backbone: Backbone, rng, path: Path) -> None:
    """A slide too big for memory, written to its h5 file block by block."""
    with H5SlideWriter(path) as w:
        for m in MAGS:
            dset = w.bag(m, len(geo.coords[m]), backbone.dim, geo.coords[m], group=f"{m}x")
            for start, block in _feature_blocks(plan, i, m, geo, space, backbone, rng):
                dset[start : start + block.shape[0]] = block


def write_backbone(plan: CohortPlan, cohort_dir: Path, backbone: Backbone, layout: str = "default") -> None:
    """Write every slide's features of one backbone (slide by slide; big slides block by block)."""
    space = _backbone_space(backbone, plan.seed)
    if layout == "default":  # atomic: build in a temp folder, then rename (safe for concurrent callers)
        final = cohort_dir / "features" / backbone.name
        tmp_root = cohort_dir / "features" / f".tmp-{backbone.name}-{os.getpid()}"
        target_root = tmp_root / "_"
    else:
        target_root = cohort_dir
    for i in range(len(plan.slides)):
        slide = plan.slides["slide_id"].iat[i]
        geo = plan.geometry(i)
        rng = np.random.default_rng([plan.seed, _h(plan.cohort.name), _h(backbone.name), 4, i])
        if layout == "default" and max(len(c) for c in geo.coords.values()) > FEATURE_BLOCK:
            _write_big_slide(plan, i, geo, space, backbone, rng, feature_path(target_root, layout, backbone, slide, 20))
            continue
        bags = {}
        for m in MAGS:
            feats = np.concatenate([b for _, b in _feature_blocks(plan, i, m, geo, space, backbone, rng)])
            bags[m] = (feats, geo.coords[m])
        write_slide(target_root, layout, backbone, slide, bags)
        del bags
    if layout == "default":
        built = target_root / "features" / backbone.name
        built.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(built, final)
        except OSError:  # another process finished first; its files are identical
            pass
        shutil.rmtree(tmp_root, ignore_errors=True)
    _mark(cohort_dir, f"{backbone.name}-{layout}", backbone_parameters(backbone))


def synthetic_parameters(backbone: Backbone) -> dict[str, float]:
    """The generator's per-backbone parameters (from ``datasets/backbones.toml``); runs record them in their config."""
    return {"noise": backbone.synthetic_noise, "signal": backbone.synthetic_signal}


def backbone_parameters(backbone: Backbone) -> str:
    """A backbone's generator parameters and dim, as recorded in its done-marker (and checked on reuse)."""
    return json.dumps({"dim": backbone.dim, **synthetic_parameters(backbone)}, sort_keys=True)


def _marker(cohort_dir: Path, what: str) -> Path:
    return cohort_dir / ".synth" / f"{what}.done"


def _mark(cohort_dir: Path, what: str, content: str = "ok") -> None:
    p = _marker(cohort_dir, what)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(content + "\n")


# ------------------------------------------------------------------------------------------ cohort base

def oracle_cindex(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index of the true risk (sksurv, ``tied_tol=1e-8``); NaN when undefined (a fold without a
    comparable pair, e.g. without events, as small presets can draw)."""
    event = np.asarray(event).astype(bool)
    if event.sum() == 0:
        return float("nan")
    try:
        return float(concordance_index_censored(event, np.asarray(time, float), np.asarray(risk, float),
                                                tied_tol=1e-8)[0])
    except (ValueError, ZeroDivisionError):  # sksurv: "no comparable pairs"
        return float("nan")


def write_base(plan: CohortPlan, cohort_dir: Path, n_folds: int = 5) -> None:
    """Clinical table, split files, tissue-type files and truth of one cohort (atomically, as one folder)."""
    tmp = cohort_dir.parent / f".tmp-{cohort_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    p, s = plan.patients, plan.slides
    clinical = pd.DataFrame(
        {
            "case_id": s["patient_id"],
            "slide_id": s["slide_file"],
            "site": "SY",
            "oncotree_code": plan.cohort.name.upper(),
            "survival_months": p.loc[s["patient_id"], "time"].to_numpy(),
            "censorship": p.loc[s["patient_id"], "censorship"].to_numpy(),
        }
    )
    clinical.to_csv(tmp / "clinical.csv")  # leading unnamed index column, like the MCAT tables
    folds = stratified_patient_folds(p[["time", "event"]], n_folds=n_folds, seed=plan.seed)
    write_splits(tmp / "splits", folds, {"command": "benchmark synth", "seed": plan.seed})
    counts = {m: 0 for m in MAGS}
    for i, slide in enumerate(s["slide_id"]):
        geo = plan.geometry(i)
        write_tissue_types(tmp, slide, {m: (geo.coords[m], geo.types[m]) for m in MAGS})
        for m in MAGS:
            counts[m] += len(geo.coords[m])
    truth_dir = tmp / "truth"
    truth_dir.mkdir()
    p.to_csv(truth_dir / "patients.csv")
    s.to_csv(truth_dir / "slides.csv", index=False)
    per_fold = [oracle_cindex(p.loc[val, "time"], p.loc[val, "event"], p.loc[val, "risk"]) for _, val in folds]
    summary = {
        "schema": SCHEMA,
        "cohort": plan.cohort.name,
        "preset": asdict(plan.preset),
        "seed": plan.seed,
        "signal": plan.signal,
        "weights": {"fine": plan.weights[0], "coarse": plan.weights[1], "cross": plan.weights[2]},
        "patients": len(p),
        "slides": len(s),
        "events": int(p["event"].sum()),
        "censoring": float(p["censorship"].mean()),
        "oracle_c_index": oracle_cindex(p["time"], p["event"], p["risk"]),
        "oracle_c_index_per_fold": per_fold,
        "mean_patches": {f"{m}x": counts[m] / len(s) for m in MAGS},
    }
    (truth_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (tmp / ".synth").mkdir()
    _marker(tmp, "base").write_text("ok\n")
    try:
        os.replace(tmp, cohort_dir)
    except OSError:  # another process created it first
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ public API

def generate(
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    seed: int = 0,
    cohorts: Iterable[str] | str = ("blca",),
    backbones: Iterable[str] | str = ("resnet50",),
    signal: str | tuple[float, float, float] = "mixed",
    layouts: Iterable[str] = ("default",),
) -> Path:
    """Write synthetic cohorts under ``out_dir`` (``out_dir/<cohort>/...``); parts already complete are reused.

    Parameters
    ----------
    out_dir : root folder (created)
    preset : ``"tiny"``, ``"demo"`` or ``"full"``
    seed : seed of everything (states, survival, tissue, features, splits)
    cohorts, backbones : names (or ``"all"``)
    signal : ``"mixed"``, ``"cross"``, ``"fine"``, ``"coarse"``, ``"none"`` or weights ``(fine, coarse, cross)``
    layouts : feature layouts to write, among ``default, trident, clam, crossfusion``

    Returns
    -------
    Path of ``out_dir``.
    """
    if preset not in PRESETS:
        raise did_you_mean(preset, list(PRESETS), "preset")
    layouts = tuple(layouts)
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        raise ValueError(f"unknown layout(s) {bad}; known: {', '.join(LAYOUTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sig_name, weights = signal_weights(signal)
    meta = out / "SYNTHETIC.json"
    info = {"schema": SCHEMA, "preset": preset, "seed": seed, "signal": sig_name, "weights": list(weights)}
    if meta.exists():
        old = json.loads(meta.read_text())
        if {k: old.get(k) for k in info} != info:
            raise ValueError(f"{out} already holds synthetic data made with {old}, not {info}; use another folder")
    else:
        tmp = meta.with_name(f".SYNTHETIC.json.{os.getpid()}")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, meta)
    for cname in resolve_cohorts(cohorts):
        plan = plan_cohort(get_cohort(cname), PRESETS[preset], seed, signal)
        cdir = out / cname
        if not _marker(cdir, "base").exists():
            write_base(plan, cdir)
        for bname in resolve_backbones(backbones):
            for layout in layouts:
                _ensure_backbone(plan, cdir, get_backbone(bname), layout)
    return out


def _ensure_backbone(plan: CohortPlan, cdir: Path, backbone: Backbone, layout: str) -> None:
    """Write one backbone's features in one layout unless done; refuse a cache made with other parameters."""
    marker = _marker(cdir, f"{backbone.name}-{layout}")
    if not marker.exists():
        write_backbone(plan, cdir, backbone, layout)
    elif (found := marker.read_text().strip()) != backbone_parameters(backbone):
        raise ValueError(
            f"{marker}: the cached {backbone.name} features were generated with {found}, but "
            f"datasets/backbones.toml now gives {backbone_parameters(backbone)}; delete "
            f"{cdir / 'features' / backbone.name} and {marker} to regenerate them")


def synthetic_root(preset: str = "demo", seed: int = 0, signal="mixed") -> Path:
    """Where :func:`ensure_synthetic` keeps a preset: ``$MIL_BENCHMARK_DATA/<preset>-<signal>-s<seed>-v<SCHEMA>``
    (default base ``<repo>/data_cache/synthetic``)."""
    base = os.environ.get("MIL_BENCHMARK_DATA") or Path(__file__).resolve().parents[2] / "data_cache" / "synthetic"
    return Path(base) / f"{preset}-{signal_weights(signal)[0]}-s{seed}-v{SCHEMA}"


def ensure_synthetic(
    preset: str = "demo", seed: int = 0, signal="mixed", cohorts="all", backbones="all"
) -> Path:
    """Generate (once; reused afterwards, also across processes) and return the root of a synthetic preset.

    Only the requested cohorts x backbones are generated now; others are added on first request, and a
    part's content never depends on which others exist.
    """
    return generate(synthetic_root(preset, seed, signal), preset, seed, cohorts, backbones, signal)


def read_truth(cohort_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict] | None:
    """``(patients truth table, summary dict)`` of a synthetic cohort, or None for real data."""
    d = Path(cohort_dir) / "truth"
    if not (d / "patients.csv").exists():
        return None
    return pd.read_csv(d / "patients.csv", index_col=0), json.loads((d / "summary.json").read_text())

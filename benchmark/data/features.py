"""Per-slide feature files: layouts, reader (with validation) and writers.

A *cohort feature root* ``R`` holds one cohort's features. Supported layouts (``{m}`` = 5, 10 or 20,
``{b}`` = canonical backbone name, ``{slide}`` = slide file name minus its extension):

===============  =====================================================================================
``default``      ``R/features/{b}/{slide}.h5`` — one h5 per slide with a group per magnification
                 (``20x``, ``10x``, ``5x``), each a TRIDENT-style bag: ``features`` (N, D) float32 and
                 ``coords`` (N, 2) int64 level-0 top-left pixels; file attributes ``patch_size`` (256) and
                 ``level0_magnification`` (40). One file per slide: 3x fewer files than one per magnification.
``trident``      ``R/{m}x_{ps}px_{ov}px_overlap/features_{trident name}/{slide}.h5`` (TRIDENT's own tree),
                 attributes ``patch_size``, ``patch_size_level0``, ``level0_magnification``,
                 ``target_magnification`` on ``coords``
``clam``         ``R/{b}/{m}x/h5_files/{slide}.h5`` (``features`` + ``coords``), or, when absent,
                 ``R/{b}/{m}x/pt_files/{slide}.pt`` (features only) with coordinates from CLAM's patch file
                 ``R/patches/{m}x/patches/{slide}.h5`` (``coords``)
``crossfusion``  ``R/{b}/x{m}/pt_files/{slide}.pt`` (the CrossFusion code), coordinates (optional) from
                 ``R/x{m}/patches/{slide}.h5``
===============  =====================================================================================

Per-patch tissue types (optional, any layout): ``R/tissue_types/{slide}.csv`` with columns
``magnification, x, y, tissue_type`` (0 tumour, 1 stroma, 2 lymphocytes, 3 necrosis, 4 other); for each
magnification, one row per patch in the order of the feature file.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from benchmark.data.backbones import Backbone, check_dim

LAYOUTS = ("default", "trident", "clam", "crossfusion")
#: Level-0 pixel size of a 256-px patch at each magnification on a 40x scan.
PATCH_SIZE = 256
LEVEL0_MAGNIFICATION = 40


def level0_patch_size(magnification: int) -> int:
    """Side in level-0 pixels of a 256-px patch taken at ``magnification`` on a 40x scan (20x: 512)."""
    return PATCH_SIZE * LEVEL0_MAGNIFICATION // magnification


def _trident_dirs(root: Path, mag: int) -> list[Path]:
    return sorted(root.glob(f"{mag}x_*px_*px_overlap"))


def feature_path(root: Path, layout: str, backbone: Backbone, slide: str, mag: int) -> Path:
    """Path of the feature file of ``slide`` at ``mag`` under ``layout`` (it may not exist)."""
    root = Path(root)
    if layout == "default":
        return root / "features" / backbone.name / f"{slide}.h5"
    if layout == "trident":
        dirs = _trident_dirs(root, mag) or [root / f"{mag}x_{PATCH_SIZE}px_0px_overlap"]
        name = backbone.trident or backbone.name
        for d in dirs:
            p = d / f"features_{name}" / f"{slide}.h5"
            if p.exists():
                return p
        return dirs[0] / f"features_{name}" / f"{slide}.h5"
    if layout == "clam":
        h5 = root / backbone.name / f"{mag}x" / "h5_files" / f"{slide}.h5"
        pt = root / backbone.name / f"{mag}x" / "pt_files" / f"{slide}.pt"
        return pt if (not h5.exists() and pt.exists()) else h5
    if layout == "crossfusion":
        return root / backbone.name / f"x{mag}" / "pt_files" / f"{slide}.pt"
    raise ValueError(f"unknown feature layout {layout!r}; known: {', '.join(LAYOUTS)} (or 'auto')")


def coords_path(root: Path, layout: str, slide: str, mag: int) -> Path | None:
    """Separate coordinate file of the ``.pt`` layouts (None for h5 layouts, which hold coords)."""
    if layout == "clam":
        return Path(root) / "patches" / f"{mag}x" / "patches" / f"{slide}.h5"
    if layout == "crossfusion":
        return Path(root) / f"x{mag}" / "patches" / f"{slide}.h5"
    return None


def tissue_type_path(root: Path, slide: str) -> Path:
    return Path(root) / "tissue_types" / f"{slide}.csv"


def detect_layout(root: Path, backbone: Backbone, slides: list[str], mag: int) -> str:
    """First layout under which some of ``slides`` has a feature file at ``mag``."""
    probe = slides[: min(len(slides), 20)]
    for layout in LAYOUTS:
        if any(feature_path(root, layout, backbone, s, mag).exists() for s in probe):
            return layout
    tried = "\n  ".join(str(feature_path(root, lay, backbone, probe[0], mag)) for lay in LAYOUTS) if probe else ""
    raise FileNotFoundError(
        f"no {backbone.name} features at {mag}x found under {root} in any known layout; looked for e.g.\n  {tried}"
    )


def _as_2d(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] == 1:  # some CLAM versions save (1, N, D)
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{path}: {what} must be a 2-D array (N, D), got shape {tuple(array.shape)}")
    return array


def read_features(
    path: Path, backbone: Backbone, *, with_coords: bool, coords_file: Path | None = None, group: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read and validate one slide's features (and coordinates).

    Returns
    -------
    features : (N, D) float32
    coords : (N, 2) int64 level-0 top-left pixels, or None when not requested

    Raises
    ------
    FileNotFoundError
        No feature file (or no coordinate file when coords are requested).
    ValueError
        Empty bag, NaN / inf values, dim different from the backbone's, coords of the wrong shape.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature file {path} does not exist")
    where = f"{path}[{group}]" if group else str(path)
    coords = None
    if path.suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "features" in obj:
            obj = obj["features"]
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor of features, got {type(obj).__name__}")
        feats = obj.detach().float().numpy()
    else:
        try:
            with h5py.File(path, "r") as f5:
                if group is not None and group not in f5:
                    raise ValueError(f"{path}: no group {group!r} (magnification) in this file (has {list(f5.keys())})")
                f = f5[group] if group is not None else f5
                if "features" not in f:
                    raise ValueError(f"{path}: h5 file has no 'features' dataset (keys: {list(f.keys())})")
                feats = f["features"][()]
                if with_coords and coords_file is None:
                    if "coords" not in f:
                        raise ValueError(f"{path}: coordinates requested but the file has no 'coords' dataset")
                    coords = f["coords"][()]
        except OSError as exc:
            raise ValueError(f"{path}: not a readable h5 file: {exc}") from exc
    feats = _as_2d(np.asarray(feats), where, "features")
    if feats.shape[0] == 0:
        raise ValueError(f"{where}: empty bag (0 patches)")
    check_dim(int(feats.shape[1]), backbone, where)
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        raise ValueError(f"{where}: features contain NaN or inf values ({bad} of {feats.shape[0]} patches)")
    if with_coords and coords is None:
        if coords_file is None or not Path(coords_file).exists():
            raise FileNotFoundError(f"coordinates requested for {path}, but coordinate file {coords_file} does not exist")
        with h5py.File(coords_file, "r") as f:
            if "coords" not in f:
                raise ValueError(f"{coords_file}: h5 file has no 'coords' dataset")
            coords = f["coords"][()]
    if coords is not None:
        coords = _as_2d(np.asarray(coords), where, "coords")
        if coords.shape != (feats.shape[0], 2):
            raise ValueError(f"{where}: coords have shape {tuple(coords.shape)}, expected ({feats.shape[0]}, 2)")
        coords = coords.astype(np.int64)
    return feats, coords


def read_tissue_types(root: Path, slide: str) -> dict[int, np.ndarray] | None:
    """Per-patch tissue types of one slide, ``{magnification: (N_m,) int64}``, or None without a file."""
    path = tissue_type_path(root, slide)
    if not path.exists():
        return None
    df = pd.read_csv(path)
    missing = [c for c in ("magnification", "tissue_type") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: tissue-type file lacks column(s) {missing}")
    types = df["tissue_type"].to_numpy()
    if len(types) and (types.min() < 0 or types.max() > 4):
        raise ValueError(f"{path}: tissue types must lie in 0..4")
    return {int(m): g["tissue_type"].to_numpy(dtype=np.int64) for m, g in df.groupby("magnification")}


# --------------------------------------------------------------------------------------------- writers

def _coords_attrs(dataset: h5py.Dataset, mag: int) -> None:
    dataset.attrs["patch_size"] = PATCH_SIZE
    dataset.attrs["patch_size_level0"] = level0_patch_size(mag)
    dataset.attrs["level0_magnification"] = LEVEL0_MAGNIFICATION
    dataset.attrs["target_magnification"] = mag


class H5SlideWriter:
    """Write one h5 file (atomically: temp file + rename) holding one or more bags, block by block, so memory
    holds one block at most::

        with H5SlideWriter(path) as w:
            feats = w.bag(20, n, dim, coords, group="20x")   # group=None: datasets at the file root
            feats[start:stop] = block                        # (b, dim) float32
    """

    def __init__(self, path: Path, attrs: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.file = h5py.File(self._tmp, "w")  # uncompressed: gzip reads ~10x slower
        self.attrs = attrs

    def bag(self, mag: int, n: int, dim: int, coords: np.ndarray, group: str | None = None) -> h5py.Dataset:
        if group and "level0_magnification" not in self.file.attrs:  # default layout: attributes once per file
            self.file.attrs["patch_size"] = PATCH_SIZE
            self.file.attrs["level0_magnification"] = LEVEL0_MAGNIFICATION
        g = self.file.create_group(group) if group else self.file
        feats = g.create_dataset("features", shape=(n, dim), dtype="float32")
        c = g.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        if self.attrs and not group:
            _coords_attrs(c, mag)
        return feats

    def __enter__(self) -> "H5SlideWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.file.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


def write_slide(
    root: Path, layout: str, backbone: Backbone, slide: str, bags: dict[int, tuple[np.ndarray, np.ndarray]]
) -> None:
    """Write one slide's bags ``{mag: (features (N, D), coords (N, 2))}`` in ``layout``.

    ``clam`` writes CLAM's three outputs (``h5_files``, ``pt_files`` and the patch-coordinate h5);
    ``crossfusion`` writes ``pt_files`` and the patch-coordinate h5.
    """
    root = Path(root)
    if layout == "default":
        with H5SlideWriter(feature_path(root, layout, backbone, slide, 20)) as w:
            for m, (x, c) in bags.items():
                w.bag(m, x.shape[0], x.shape[1], c, group=f"{m}x")[...] = x
        return
    for m, (x, c) in bags.items():
        if layout in ("trident", "clam"):
            h5 = feature_path(root, layout, backbone, slide, m)
            if layout == "clam":
                h5 = root / backbone.name / f"{m}x" / "h5_files" / f"{slide}.h5"
            with H5SlideWriter(h5, attrs=layout == "trident") as w:
                w.bag(m, x.shape[0], x.shape[1], c)[...] = x
        if layout in ("clam", "crossfusion"):
            sub = f"{m}x" if layout == "clam" else f"x{m}"
            pt = root / backbone.name / sub / "pt_files" / f"{slide}.pt"
            pt.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), pt)
            cpath = coords_path(root, layout, slide, m)
            cpath.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(cpath, "w") as f:  # CLAM create_patches output: coords + patch attributes
                d = f.create_dataset("coords", data=np.asarray(c, dtype=np.int64))
                d.attrs["patch_level"] = 0
                d.attrs["patch_size"] = level0_patch_size(m)
        elif layout not in ("trident", "clam"):
            raise ValueError(f"unknown feature layout {layout!r}; known: {', '.join(LAYOUTS)}")


def write_tissue_types(root: Path, slide: str, bags: dict[int, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write the per-patch tissue-type CSV of one slide from ``{mag: (coords (N, 2), types (N,))}``."""
    path = tissue_type_path(root, slide)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["magnification,x,y,tissue_type"]
    for m, (c, t) in bags.items():
        lines.extend(f"{m},{x},{y},{k}" for (x, y), k in zip(c.tolist(), t.tolist()))
    path.write_text("\n".join(lines) + "\n")
    return path


def read_slide(
    root: Path, layout: str, backbone: Backbone, slide: str, mags: tuple[int, ...], with_coords: bool
) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """Read the bags of one slide at ``mags``: ``{mag: (features (N, D) float32, coords (N, 2) int64 or None)}``."""
    out = {}
    for m in mags:
        path = feature_path(root, layout, backbone, slide, m)
        if not path.exists():
            raise FileNotFoundError(
                f"slide {slide!r}: no {backbone.name} feature file at {m}x; expected {path} ({layout} layout)"
            )
        out[m] = read_features(
            path, backbone, with_coords=with_coords,
            coords_file=coords_path(root, layout, slide, m) if path.suffix == ".pt" else None,
            group=f"{m}x" if layout == "default" else None,
        )
    return out

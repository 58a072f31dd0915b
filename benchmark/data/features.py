"""Per-slide feature files: layouts, folder search, layout detection, reader (with validation) and writers.

Features are found in *folders*, one per magnification or one for all (``--features DIR`` or
``--features 20x=DIR 10x=DIR 5x=DIR``; without ``--features``, the cohort folder ``R`` of the data root).
Inside a folder each layout looks, in this order, at (``{m}`` = 5, 10 or 20, ``{b}`` = canonical backbone
name, ``{enc}`` = the backbone's TRIDENT encoder name, ``{slide}`` = slide file name minus its extension):

===============  =====================================================================================
``default``      ``features/{b}/{slide}.h5`` — one h5 per slide with a group per magnification (``20x``,
                 ``10x``, ``5x``), each with ``features`` (N, D) float32 and ``coords`` (N, 2) int64 level-0
                 top-left pixels (the synthetic cohorts)
``trident``      a TRIDENT job folder: ``{m}x_{ps}px_{ov}px_overlap/features_{enc}/{slide}.h5``; a folder given
                 for one magnification may also be the ``features_{enc}`` folder itself or hold it
``clam``         ``{b}/{m}x/{h5_files,pt_files}/`` or ``{m}x/{h5_files,pt_files}/``; a folder given for one
                 magnification is CLAM's ``FEAT_DIR`` itself: ``h5_files/{slide}.h5`` (``features`` +
                 ``coords``), else ``pt_files/{slide}.pt`` (features only)
``crossfusion``  ``{b}/x{m}/pt_files/{slide}.pt`` (the CrossFusion code); a folder given for one magnification
                 may also be a ``pt_files`` parent or hold the ``.pt`` files
===============  =====================================================================================

A folder given without a magnification serves every magnification through the entries that name one
(``{m}x_...``, ``{b}/{m}x``, ``x{m}``, the ``default`` groups) and 20x through the others (CLAM and TRIDENT
extract at 20x by default), so 10x features are never read from a 20x folder by accident.

Coordinates of ``.pt`` files (which hold features only) come from the first existing of: CLAM's
``h5_files/{slide}.h5`` beside ``pt_files``, ``R/patches/{m}x/patches/{slide}.h5`` (CLAM's patch output),
``R/x{m}/patches/{slide}.h5`` (CrossFusion), ``<folder>/patches/{slide}.h5``.

Per-patch tissue types (optional, any layout): ``R/tissue_types/{slide}.csv`` with columns
``magnification, x, y, tissue_type`` (0 tumour, 1 stroma, 2 lymphocytes, 3 necrosis, 4 other); for each
magnification, one row per patch in the order of the feature file.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from benchmark.choices import LAYOUTS
from benchmark.data.cohorts import Backbone, check_dim

#: Level-0 pixel size of a 256-px patch at each magnification on a 40x scan.
PATCH_SIZE = 256
LEVEL0_MAGNIFICATION = 40
#: Key of :data:`FeatureFolders` for a folder given without a magnification.
ANY_MAGNIFICATION = None
#: ``{magnification or None: folder}``: where a cohort's features are (see the module docstring).
FeatureFolders = dict


def level0_patch_size(magnification: int) -> int:
    """Side in level-0 pixels of a 256-px patch taken at ``magnification`` on a 40x scan (20x: 512)."""
    return PATCH_SIZE * LEVEL0_MAGNIFICATION // magnification


def _trident_dirs(root: Path, mag: int) -> list[Path]:
    return sorted(root.glob(f"{mag}x_*px_*px_overlap"))


def _candidate_dirs(folder: Path, layout: str, backbone: Backbone, mag: int, named_only: bool) -> list[tuple[Path, str]]:
    """``(directory, file suffix)`` pairs where ``layout`` keeps ``mag`` features inside ``folder``, in search
    order; ``named_only`` keeps the entries whose path names the magnification."""
    folder, b = Path(folder), backbone.name
    if layout == "default":
        return [(folder / "features" / b, ".h5")]
    if layout == "trident":
        enc = backbone.trident or b
        trident = _trident_dirs(folder, mag) or [folder / f"{mag}x_{PATCH_SIZE}px_0px_overlap"]
        named = [(d / f"features_{enc}", ".h5") for d in trident]
        unnamed = [(folder / f"features_{enc}", ".h5"), (folder, ".h5")]
    elif layout == "clam":
        named = [(base / sub, suffix) for base in (folder / b / f"{mag}x", folder / f"{mag}x")
                 for sub, suffix in (("h5_files", ".h5"), ("pt_files", ".pt"))]
        unnamed = [(folder / "h5_files", ".h5"), (folder / "pt_files", ".pt")]
    elif layout == "crossfusion":
        named = [(folder / b / f"x{mag}" / "pt_files", ".pt")]
        unnamed = [(folder / "pt_files", ".pt"), (folder, ".pt")]
    else:
        raise ValueError(f"--layout {layout}: unknown feature layout; known: auto, {', '.join(LAYOUTS)}")
    return named if named_only else named + unnamed


def _folder_for(folders: FeatureFolders, mag: int) -> tuple[Path, bool] | None:
    """The folder serving ``mag`` and whether only magnification-named entries count there."""
    if mag in folders:
        return Path(folders[mag]), False
    if ANY_MAGNIFICATION in folders:
        return Path(folders[ANY_MAGNIFICATION]), mag != 20
    return None


def find_feature_file(folders: FeatureFolders, layout: str, backbone: Backbone, slide: str, mag: int) -> Path:
    """Feature file of ``slide`` at ``mag``: the first existing candidate, else the first one (for messages).

    Raises
    ------
    FileNotFoundError
        No folder serves ``mag`` (``--features`` named other magnifications only).
    """
    found = _folder_for(folders, mag)
    if found is None:
        given = ", ".join(f"{m}x" for m in folders if m is not None)
        raise FileNotFoundError(f"--features: no folder for {mag}x features (given: {given}); pass "
                                f"--features {mag}x=DIR as well")
    candidates = [d / f"{slide}{suffix}" for d, suffix in _candidate_dirs(found[0], layout, backbone, mag, found[1])]
    return next((p for p in candidates if p.is_file()), candidates[0])


def expected_feature_file(folders: FeatureFolders, layout: str, backbone: Backbone, slide: str, mag: int) -> Path:
    """Where ``slide``'s missing ``mag`` file was looked for, for messages: in the first candidate folder that holds
    feature files (the one the other slides use), else the first candidate."""
    found = _folder_for(folders, mag)
    if found is not None:
        for directory, suffix in _candidate_dirs(found[0], layout, backbone, mag, found[1]):
            if _stems_with_files(directory, suffix):
                return directory / f"{slide}{suffix}"
    return find_feature_file(folders, layout, backbone, slide, mag)


def feature_path(root: Path, layout: str, backbone: Backbone, slide: str, mag: int) -> Path:
    """Path of the feature file of ``slide`` at ``mag`` under ``layout`` in cohort folder ``root`` (it may not
    exist)."""
    return find_feature_file({ANY_MAGNIFICATION: Path(root)}, layout, backbone, slide, mag)


def coords_path(root: Path, layout: str, slide: str, mag: int) -> Path | None:
    """Coordinate file the writers put beside ``.pt`` features (None for h5 layouts, which hold coords)."""
    if layout == "clam":
        return Path(root) / "patches" / f"{mag}x" / "patches" / f"{slide}.h5"
    if layout == "crossfusion":
        return Path(root) / f"x{mag}" / "patches" / f"{slide}.h5"
    return None


def find_coords_file(pt_file: Path, folder: Path, slide: str, mag: int) -> Path | None:
    """Coordinates of a ``.pt`` feature file (see the module docstring), or None when there are none."""
    pt_file, folder = Path(pt_file), Path(folder)
    candidates = [pt_file.parent.parent / "h5_files" / f"{slide}.h5", coords_path(folder, "clam", slide, mag),
                  coords_path(folder, "crossfusion", slide, mag), folder / "patches" / f"{slide}.h5"]
    return next((p for p in candidates if p.is_file()), None)


def tissue_type_path(root: Path, slide: str) -> Path:
    return Path(root) / "tissue_types" / f"{slide}.csv"


@dataclass(frozen=True)
class LayoutDetection:
    """What :func:`detect_layout` found: the layout, and how many of the slides have a file under it."""

    layout: str
    found: int
    checked: int

    def describe(self) -> str:
        return (f"{self.layout} layout (auto-detected; {self.found} of {self.checked} slides have a feature file, "
                f"every slide checked)")


def _stems_with_files(directory: Path, suffix: str) -> set[str]:
    try:
        return {name[: -len(suffix)] for name in os.listdir(directory) if name.endswith(suffix)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def count_feature_files(folders: FeatureFolders, layout: str, backbone: Backbone, slides: list[str], mag: int) -> set[str]:
    """The slides of ``slides`` that have a ``mag`` feature file under ``layout`` (one directory listing per
    candidate folder, so every slide is checked even in cohorts of thousands)."""
    found = _folder_for(folders, mag)
    if found is None:
        return set()
    present: set[str] = set()
    for directory, suffix in _candidate_dirs(found[0], layout, backbone, mag, found[1]):
        present |= _stems_with_files(directory, suffix)
    return present & set(slides)


def detect_layout(folders: FeatureFolders | Path, backbone: Backbone, slides: list[str], mag: int = 20) -> LayoutDetection:
    """The layout under which most of ``slides`` have a feature file at ``mag`` (ties: :data:`LAYOUTS` order).

    Raises
    ------
    FileNotFoundError
        No slide has a file in any layout; the message lists where it looked for the first slide.
    """
    if not isinstance(folders, dict):
        folders = {ANY_MAGNIFICATION: Path(folders)}
    counts = {layout: len(count_feature_files(folders, layout, backbone, slides, mag)) for layout in LAYOUTS}
    best = max(LAYOUTS, key=lambda layout: counts[layout])  # max keeps the first of equal counts
    if counts[best] == 0:
        where = "; ".join(str(find_feature_file(folders, lay, backbone, slides[0], mag)) for lay in LAYOUTS) \
            if slides else "(the table has no slides)"
        shown = ", ".join(str(f) for f in folders.values())
        raise FileNotFoundError(f"{shown}: no {backbone.name} features at {mag}x for any of the {len(slides)} slides "
                                f"in any known layout; looked for e.g. {where}")
    return LayoutDetection(best, counts[best], len(slides))


def _as_2d(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] == 1:  # some CLAM versions save (1, N, D)
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{path}: {what} must be a 2-D array (N, D), got shape {tuple(array.shape)}")
    return array


def _unpickling_problem(exc: pickle.UnpicklingError) -> str:
    """One line for a ``torch.load(weights_only=True)`` refusal: pickled objects, or bytes that are no pickle."""
    text = str(exc)
    detail = next((line.strip() for line in text.split("WeightsUnpickler error:")[-1].splitlines() if line.strip()),
                  text.splitlines()[0] if text else "")
    if "Unsupported global" in text:
        return (f"holds pickled Python objects, not a plain tensor (refused: unpickling can run code; {detail}); "
                "save the features with torch.save(tensor)")
    return (f"not a readable torch feature file (corrupt, or pickled objects torch refuses to load: {detail}); "
            "save the features with torch.save(tensor)")


def _load_tensor_file(path: Path) -> np.ndarray:
    """Features of a ``.pt`` file (a tensor, or a dict with a ``features`` tensor); unreadable -> ValueError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: {_unpickling_problem(exc)}") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable torch feature file (truncated or corrupt: {reason})") from None
    if isinstance(obj, dict) and "features" in obj:
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor of features, got {type(obj).__name__}")
    return obj.detach().float().numpy()


def _check_magnification(node, path: Path, magnification: int | None) -> None:
    """A TRIDENT file records the magnification it was extracted at (``target_magnification`` on ``coords``):
    a folder of 10x features given as 20x is an error, not a silent mix of scales."""
    coords = node.get("coords") if hasattr(node, "get") else None
    found = coords.attrs.get("target_magnification") if coords is not None else None
    if magnification is not None and found is not None and int(found) != int(magnification):
        raise ValueError(f"{path}: features extracted at {int(found)}x (target_magnification), read as "
                         f"{magnification}x; give this folder as --features {int(found)}x=DIR")


def _read_h5(path: Path, group: str | None, want_coords: bool,
             magnification: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``features`` (and ``coords`` when asked) of an h5 feature file, or of one group of it."""
    try:
        with h5py.File(path, "r") as f5:
            if group is not None and group not in f5:
                raise ValueError(f"{path}: no group {group!r} (magnification) in this file (has {list(f5.keys())})")
            f = f5[group] if group is not None else f5
            if "features" not in f:
                raise ValueError(f"{path}: h5 file has no 'features' dataset (keys: {list(f.keys())})")
            _check_magnification(f, path, magnification)
            feats = f["features"][()]
            if not want_coords:
                return feats, None
            if "coords" not in f:
                raise ValueError(f"{path}: coordinates requested but the file has no 'coords' dataset")
            return feats, f["coords"][()]
    except OSError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable h5 file ({reason})") from None


def validate_coords(coords: np.ndarray, n_patches: int, where: str) -> np.ndarray:
    """Level-0 coordinates as (N, 2) int64; NaN / inf / negative values or a wrong shape -> ValueError."""
    coords = _as_2d(np.asarray(coords), where, "coords")
    if coords.shape != (n_patches, 2):
        raise ValueError(f"{where}: coords have shape {tuple(coords.shape)}, expected ({n_patches}, 2)")
    if coords.dtype.kind == "f":
        bad = ~np.isfinite(coords).all(axis=1)
        if bad.any():  # a cast would turn NaN into INT64_MIN without an error
            raise ValueError(f"{where}: coords contain NaN or inf values ({int(bad.sum())} of {n_patches} patches)")
        coords = np.rint(coords)
    elif coords.dtype.kind not in "iu":
        raise ValueError(f"{where}: coords must be numbers, got dtype {coords.dtype}")
    if (coords < 0).any():
        raise ValueError(f"{where}: coords hold negative values (level-0 pixel positions are >= 0)")
    return coords.astype(np.int64)


def _h5_feature_dim(path: Path, group: str | None) -> int:
    try:
        with h5py.File(path, "r") as f5:
            node = f5[group] if group is not None and group in f5 else f5
            if "features" not in node:
                raise ValueError(f"{path}: h5 file has no 'features' dataset (keys: {list(node.keys())})")
            return int(node["features"].shape[-1])
    except OSError as exc:
        raise ValueError(f"{path}: not a readable h5 file ({str(exc).strip().splitlines()[0]})") from None


def feature_dim(path: Path, group: str | None = None) -> int:
    """The feature dim of one file, from its header (h5: the dataset's shape; ``.pt``: the tensor's shape,
    memory-mapped), without reading the features."""
    path = Path(path)
    if path.suffix != ".pt":
        return _h5_feature_dim(path, group)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile):
        return int(_load_tensor_file(path).shape[-1])  # legacy format (no mmap) or a clear error
    obj = obj["features"] if isinstance(obj, dict) and "features" in obj else obj
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor of features, got {type(obj).__name__}")
    return int(obj.shape[-1])


def read_features(
    path: Path, backbone: Backbone, *, with_coords: bool, coords_file: Path | None = None, group: str | None = None,
    magnification: int | None = None,
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
        Unreadable file (truncated, corrupt, pickled objects), empty bag, NaN / inf values, dim different from
        the backbone's, coords of the wrong shape or with NaN / negative values, a TRIDENT file extracted at
        another magnification than ``magnification``; each names the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature file {path} does not exist")
    where = f"{path}[{group}]" if group else str(path)
    coords = None
    if path.suffix == ".pt":
        feats = _load_tensor_file(path)
    else:
        feats, coords = _read_h5(path, group, with_coords and coords_file is None, magnification)
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
            raise FileNotFoundError(f"{path}: coordinates requested, but no coordinate file was found"
                                    + (f" ({coords_file} does not exist)" if coords_file else ""))
        where = str(coords_file)
        _, coords = _read_coords_file(Path(coords_file))
    if coords is not None:
        coords = validate_coords(coords, feats.shape[0], where)
    return feats, coords


def _read_coords_file(path: Path) -> tuple[None, np.ndarray]:
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise ValueError(f"{path}: h5 file has no 'coords' dataset")
            return None, f["coords"][()]
    except OSError as exc:
        raise ValueError(f"{path}: not a readable h5 file ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None


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
    root: Path, layout: str, backbone: Backbone, slide: str, mags: tuple[int, ...], with_coords: bool,
    folders: FeatureFolders | None = None,
) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """Read the bags of one slide at ``mags``: ``{mag: (features (N, D) float32, coords (N, 2) int64 or None)}``.

    ``folders`` are the feature folders (default: the cohort folder ``root`` for every magnification).
    """
    folders = folders or {ANY_MAGNIFICATION: Path(root)}
    out = {}
    for m in mags:
        path = find_feature_file(folders, layout, backbone, slide, m)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: slide {slide!r} has no {backbone.name} feature file at {m}x ({layout} layout)"
            )
        folder = _folder_for(folders, m)[0]
        out[m] = read_features(
            path, backbone, with_coords=with_coords,
            coords_file=find_coords_file(path, Path(root), slide, m) or find_coords_file(path, folder, slide, m)
            if path.suffix == ".pt" else None,
            group=f"{m}x" if layout == "default" else None, magnification=m,
        )
    return out

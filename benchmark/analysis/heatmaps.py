"""Attention maps over the slide image, the top- and bottom-attention patches, and a QuPath export.

Over the slide (``plot heatmap --slide-file``)
    Each map's scores become percentile ranks within the slide (CLAM's display; ties share a rank), coloured and
    blended (alpha :data:`ALPHA`) over the slide thumbnail. A patch covers its own level-0 square (its corner as
    the feature file stores it, its side from :func:`benchmark.data.slides.patch_geometry`), so a 5x patch covers
    sixteen 20x patches' area. The thumbnail itself is drawn beside the overlays, as in the paper's Figure 3.

Top patches (``--top-k K``)
    The K highest- and K lowest-attention patches of every map, read from the slide at the feature
    magnification (the pixels the encoder saw), saved as PNG with an index CSV of their coordinates and scores,
    as CLAM's heatmap scripts do.

QuPath (``--geojson FILE``)
    A GeoJSON ``FeatureCollection`` with one polygon per patch (level-0 pixels; patches of one magnification
    share a polygon across maps), ``properties.objectType = "detection"`` and the scores as
    ``properties.measurements`` (``{name: value}``), the form QuPath's *File > Import objects from file* reads;
    *Measure > Show measurement maps* then colours the patches by any map.
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from scipy.stats import rankdata  # noqa: E402

from benchmark.data.slides import PatchGeometry, SlideImage, check_inside  # noqa: E402
from benchmark.naming import path_under, safe_name  # noqa: E402

ALPHA = 0.5
OVERLAY_CMAP = "jet"
THUMBNAIL_SIDE = 1024
#: characters per title line: panels of ~3.4 in at 8 pt hold about 45
TITLE_WIDTH = 44


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Scores -> percentile ranks in [0, 1] (CLAM-style display; ties share a rank)."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return np.ones_like(v)
    return (rankdata(v) - 1) / (len(v) - 1)


def panel_title(name: str, magnification: int, overlap: Mapping | None = None) -> str:
    """A panel title wrapped to the panel's width: the map, then its overlap with the planted signal if any."""
    lines = [f"{name} ({magnification}x)"]
    if overlap:
        o = overlap
        lines += [f"AUC {o['auc']:.2f} ({o['n_signal']} tumour vs {o['n_patches'] - o['n_signal']} other)",
                  f"top-10% on tumour {o['top_precision']:.0%} (chance {o['prevalence']:.0%})"]
    return "\n".join(part for line in lines for part in textwrap.wrap(line, TITLE_WIDTH))


def overlapping_titles(fig: plt.Figure) -> list[tuple[str, str]]:
    """Pairs of (title, title or panel) whose rendered boxes intersect; empty when every title stands clear.

    Renders the figure (``canvas.draw``) and compares the window extents of the axes titles, the figure's
    suptitle and the other panels' drawing areas.
    """
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    titles = [(t.get_text(), t.get_window_extent(renderer), ax) for ax in fig.axes
              for t in (ax.title, ax._left_title, ax._right_title) if t.get_text()]
    if fig._suptitle is not None and fig._suptitle.get_text():
        titles.append((fig._suptitle.get_text(), fig._suptitle.get_window_extent(renderer), None))
    clashes = []
    for i, (text, box, owner) in enumerate(titles):
        clashes += [(text, other) for other, obox, _ in titles[i + 1:] if box.overlaps(obox)]
        clashes += [(text, f"panel {j}") for j, ax in enumerate(fig.axes)
                    if ax is not owner and ax.get_visible() and ax.axison and box.overlaps(ax.get_window_extent(renderer))]
    return clashes


def thumbnail_boxes(coords: np.ndarray, side: float, scale: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """(N, 4) ``x0, y0, x1, y1`` thumbnail-pixel boxes (end exclusive, at least one pixel, clipped) of patches
    with level-0 corners ``coords`` and level-0 side ``side``."""
    c = np.asarray(coords, float)
    sx, sy = scale
    x0 = np.floor(c[:, 0] * sx).astype(int)
    y0 = np.floor(c[:, 1] * sy).astype(int)
    x1 = np.maximum(x0 + 1, np.ceil((c[:, 0] + side) * sx).astype(int))
    y1 = np.maximum(y0 + 1, np.ceil((c[:, 1] + side) * sy).astype(int))
    h, w = shape
    return np.stack([np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)], axis=1)


def blend(thumbnail: np.ndarray, boxes: np.ndarray, values01: np.ndarray, cmap: str = OVERLAY_CMAP,
          alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """The thumbnail with each box painted in its value's colour at ``alpha``; returns (overlay uint8, drawn
    mask). Higher values are painted last, so they stay visible where patches overlap."""
    colours = plt.get_cmap(cmap)(np.asarray(values01, float))[:, :3] * 255.0
    layer = np.zeros(thumbnail.shape, float)
    drawn = np.zeros(thumbnail.shape[:2], bool)
    for i in np.argsort(values01, kind="stable"):
        x0, y0, x1, y1 = boxes[i]
        layer[y0:y1, x0:x1] = colours[i]
        drawn[y0:y1, x0:x1] = True
    overlay = thumbnail.astype(float)
    overlay[drawn] = (1 - alpha) * overlay[drawn] + alpha * layer[drawn]
    return np.clip(np.rint(overlay), 0, 255).astype(np.uint8), drawn


@dataclass
class SlideOverlay:
    """Maps blended over one slide's thumbnail.

    Attributes
    ----------
    thumbnail : (h, w, 3) uint8 RGB
    scale : thumbnail pixels per level-0 pixel (x, y)
    geometry : patch geometry per magnification
    overlays : per map, the blended (h, w, 3) image
    drawn : per map, the (h, w) mask of thumbnail pixels its patches cover
    top_patches : rows of the top-patch index (``--top-k``)
    """

    thumbnail: np.ndarray
    scale: tuple[float, float]
    geometry: dict[int, PatchGeometry]
    overlays: dict[str, np.ndarray] = field(default_factory=dict)
    drawn: dict[str, np.ndarray] = field(default_factory=dict)
    top_patches: list[dict] = field(default_factory=list)


def slide_overlay(maps: Sequence, slide: SlideImage, geometry: Mapping[int, PatchGeometry],
                  max_side: int = THUMBNAIL_SIDE) -> SlideOverlay:
    """Blend every map (objects with ``name, magnification, coords, values``) over the slide's thumbnail.

    Raises
    ------
    ValueError
        A patch corner lies outside the slide (features of another slide).
    """
    for pm in maps:
        check_inside(pm.coords, slide, f"map {pm.name} ({pm.magnification}x)")
    thumbnail, scale = slide.thumbnail(max_side)
    result = SlideOverlay(thumbnail, scale, dict(geometry))
    for pm in maps:
        boxes = thumbnail_boxes(pm.coords, geometry[pm.magnification].side, scale, thumbnail.shape[:2])
        result.overlays[pm.name], result.drawn[pm.name] = blend(thumbnail, boxes, percentile_rank(pm.values))
    return result


def slide_figure(overlay: SlideOverlay, maps: Sequence, titles: Mapping[str, str], suptitle: str) -> plt.Figure:
    """The thumbnail beside each map's overlay, one colour bar for all (percentile ranks), titles wrapped."""
    panels = 1 + len(maps)
    nrows = -(-panels // 4)  # at most four panels a row, rows filled evenly
    ncols = -(-panels // nrows)
    h, w = overlay.thumbnail.shape[:2]
    width = 3.4
    fig = plt.figure(figsize=(width * ncols + 1.4, (width * h / w + 0.6) * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    axes[0].imshow(overlay.thumbnail)
    axes[0].set_title(f"slide ({1 / overlay.scale[0]:.0f}x downsampled)", fontsize=8)
    for ax, pm in zip(axes[1:], maps):
        ax.imshow(overlay.overlays[pm.name])
        ax.set_title(titles[pm.name], fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.colorbar(ScalarMappable(Normalize(0, 1), plt.get_cmap(OVERLAY_CMAP)), ax=axes[1:panels], shrink=0.7,
                 label="attention percentile within the slide")
    fig.suptitle(suptitle, fontsize=10)
    return fig


def top_patches(slide: SlideImage, maps: Sequence, geometry: Mapping[int, PatchGeometry], k: int,
                folder: Path) -> list[dict]:
    """Save the ``k`` highest- and ``k`` lowest-attention patches of every map as PNG (read from the slide at the
    feature magnification) and an ``index.csv`` of their coordinates and scores in ``folder``; returns its rows."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for pm in maps:
        g = geometry[pm.magnification]
        pct = percentile_rank(pm.values)
        order = np.argsort(-np.asarray(pm.values, float), kind="stable")
        n = min(k, len(order))
        for kind, picks in (("high", order[:n]), ("low", order[::-1][:n])):
            for rank, i in enumerate(picks, start=1):
                x, y = (int(v) for v in pm.coords[i])
                name = safe_name(f"{pm.name}_{kind}{rank:02d}_x{x}_y{y}.png")
                Image.fromarray(slide.read_patch(x, y, g.side, g.size)).save(path_under(folder, name))
                rows.append({"map": pm.name, "magnification": pm.magnification, "kind": kind, "rank": rank, "x": x,
                             "y": y, "side_level0": g.side, "size_px": g.size, "score": float(pm.values[i]),
                             "percentile": float(pct[i]), "file": name})
    pd.DataFrame(rows).to_csv(folder / "index.csv", index=False)
    return rows


def _groups_by_patch_set(maps: Sequence) -> list[list]:
    """Maps grouped by identical patch sets (same magnification and coordinates), in first-seen order."""
    groups: list[list] = []
    for pm in maps:
        home = next((g for g in groups if g[0].magnification == pm.magnification
                     and np.array_equal(g[0].coords, pm.coords)), None)
        if home is None:
            groups.append([pm])
        else:
            home.append(pm)
    return groups


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def attention_geojson(maps: Sequence, geometry: Mapping[int, PatchGeometry], slide_id: str) -> dict:
    """The maps as a QuPath-readable GeoJSON ``FeatureCollection`` (see the module docstring)."""
    features = []
    for group in _groups_by_patch_set(maps):
        m = group[0].magnification
        side = _number(geometry[m].side)
        pcts = {pm.name: percentile_rank(pm.values) for pm in group}
        for i, (x, y) in enumerate(np.asarray(group[0].coords).tolist()):
            ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
            measurements = {"magnification": m}
            for pm in group:
                measurements[f"{pm.name} score"] = float(pm.values[i])
                measurements[f"{pm.name} percentile"] = float(pcts[pm.name][i])
            features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                             "properties": {"objectType": "detection", "name": f"{slide_id} {m}x patch",
                                            "classification": {"name": f"{m}x patch"},
                                            "measurements": measurements}})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, maps: Sequence, geometry: Mapping[int, PatchGeometry], slide_id: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(attention_geojson(maps, geometry, slide_id)))
    return path

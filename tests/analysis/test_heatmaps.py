"""Heatmap figures without a slide image: titles that never overlap (rendered text boxes), the QuPath GeoJSON of a
patch-grid map, and the slide options' bad inputs (one line each, nothing written). The real-slide tests are in
test_heatmaps_slide.py."""
from __future__ import annotations

import json
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

from benchmark.analysis import heatmaps, plots
from benchmark.cli import main
from benchmark.data import slides
from fakes import write_untrained_cell

CROSSFUSION_MAPS = ("coarse_cross", "fine_cross", "source_transformer", "final_transformer", "final_cls")


def _grid(n: int, step: int) -> np.ndarray:
    return np.array([(x * step, y * step) for y in range(n) for x in range(n)], dtype=np.int64)


def _long_overlap(n: int) -> dict:
    # the widest numbers a real slide gives: four-digit class sizes
    return {"auc": 0.6234, "n_signal": 1234, "n_patches": 1234 + 5678, "top_precision": 0.4, "prevalence": 0.18}


def _crossfusion_like_result() -> plots.HeatmapResult:
    rng = np.random.default_rng(0)
    mags = {"coarse_cross": 5, "fine_cross": 10, "source_transformer": 5, "final_transformer": 5, "final_cls": 5}
    maps = [plots.PatchMap(n, mags[n], _grid(4 * 20 // (5 * mags[n]) * 2, 512 * 20 // mags[n]), None)
            for n in CROSSFUSION_MAPS]
    for pm in maps:
        pm.values = rng.random(len(pm.coords))
    res = plots.HeatmapResult("crossfusion", "blca", 0, "TCGA-XX-0000-01Z-00-DX1", "TCGA-XX-0000", maps)
    res.overlap = {pm.name: _long_overlap(len(pm.coords)) for pm in maps}
    c20 = _grid(16, 512)
    res.tissue = {20: plots.PatchMap("tissue", 20, c20, rng.integers(0, 5, len(c20))),
                  5: plots.PatchMap("tissue", 5, _grid(4, 2048), rng.integers(0, 5, 16))}
    res.signal = {m: plots.PatchMap("tumour fraction", m, t.coords, rng.random(len(t.coords)))
                  for m, t in res.tissue.items()}
    return res


def test_overlap_check_notices_overlapping_titles():
    fig, axes = plt.subplots(1, 3, figsize=(6, 2))
    for ax in axes:
        ax.set_title("a title far too long for its narrow panel, running into the next one")
    assert heatmaps.overlapping_titles(fig)
    plt.close(fig)


def test_grid_figure_titles_never_overlap():
    fig = plots.heatmap_figure(_crossfusion_like_result())
    assert heatmaps.overlapping_titles(fig) == []
    texts = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert any("1234 tumour vs 5678 other" in t for t in texts)  # the AUC line is still there, wrapped
    plt.close(fig)


@pytest.mark.parametrize("shape", [(900, 600), (500, 1000)])
def test_slide_figure_titles_never_overlap(shape):
    res = _crossfusion_like_result()
    thumb = np.full((*shape, 3), 230, np.uint8)
    overlay = heatmaps.SlideOverlay(thumb, (0.05, 0.05), {})
    overlay.overlays = {pm.name: thumb for pm in res.maps}
    titles = {pm.name: heatmaps.panel_title(pm.name, pm.magnification, res.overlap[pm.name]) for pm in res.maps}
    fig = heatmaps.slide_figure(overlay, res.maps, titles, "crossfusion on BLCA slide TCGA-XX (fold 0 model)")
    assert heatmaps.overlapping_titles(fig) == []
    assert sum(1 for ax in fig.axes if ax.get_label() == "<colorbar>") == 1
    plt.close(fig)


def test_thumbnail_boxes_and_blend():
    boxes = heatmaps.thumbnail_boxes(np.array([[0, 0], [1000, 500], [1990, 990]]), 100, (0.1, 0.1), (100, 200))
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 10], [100, 50, 110, 60], [199, 99, 200, 100]])
    thumb = np.full((100, 200, 3), 200, np.uint8)
    out, drawn = heatmaps.blend(thumb, boxes, np.array([0.0, 1.0, 0.5]), alpha=0.5)
    assert drawn.sum() == 100 + 100 + 1 and (out[~drawn] == 200).all()
    red = np.array(plt.get_cmap(heatmaps.OVERLAY_CMAP)(1.0)[:3]) * 255
    np.testing.assert_allclose(out[55, 105], np.rint(0.5 * 200 + 0.5 * red), atol=1)


def test_percentile_rank_ties_share_a_rank():
    np.testing.assert_allclose(heatmaps.percentile_rank(np.array([3.0, 1.0, 1.0, 7.0])), [2 / 3, 1 / 6, 1 / 6, 1.0])


def _cell(tiny_root, tmp_path):
    from benchmark.data.loader import load_cohort

    cohort = load_cohort("blca", data_root=tiny_root, backbone="resnet50")
    _, val = write_untrained_cell(tmp_path / "store", cohort, "amil", tiny_root, fold=0)
    return cohort, cohort.samples.at[val[0], "slide_ids"][0]


def test_geojson_of_a_grid_map_without_slide(tiny_root, tmp_path):
    from benchmark.commands.plot import heatmap

    cohort, slide = _cell(tiny_root, tmp_path)
    res = heatmap(tmp_path / "store", "amil", "blca", slide, out=tmp_path / "fig", cohort_data=cohort,
                  geojson=tmp_path / "a.geojson")
    pm = res.maps[0]
    assert res.overlay is None and res.geometry[20].side == plots.grid_step(pm.coords) == 512
    assert "assumed" in res.geometry[20].source
    features = json.loads((tmp_path / "a.geojson").read_text())["features"]
    rings = np.array([f["geometry"]["coordinates"][0] for f in features])
    np.testing.assert_array_equal(rings[:, 0], pm.coords)
    np.testing.assert_array_equal(rings[:, 2] - rings[:, 0], np.full_like(pm.coords, 512))
    pct = [f["properties"]["measurements"]["attention percentile"] for f in features]
    np.testing.assert_allclose(pct, heatmaps.percentile_rank(pm.values))
    assert tmp_path / "a.geojson" in res.files


def _run(tmp_path, tiny_root, slide, *extra):
    return main(["plot", "heatmap", "--results", str(tmp_path / "store"), "--method", "amil", "--dataset", "blca",
                 "--slide", slide, "--out", str(tmp_path / "fig"), *extra])


def _one_line_error(capsys, rc) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("case, message", [
    ("missing-library", "--slide-file: reading slides needs openslide or tiffslide, and neither is installed; "
                        "install the slides extra: pip install -e '.[slides]'"),
    ("no-such-file", "does not exist"),
    ("top-k-without-slide", "--top-k: patch images are read from the slide; give --slide-file (or --slide-dir)"),
    ("negative-top-k", "--top-k -1: must be >= 0"),
    ("no-slide-dir", "--slide-dir"),
    ("slide-dir-escape", "would name a file outside it"),
])
def test_slide_options_bad_input(confined, capsys, tiny_root, tmp_path, monkeypatch, case, message):  # noqa: F811
    _, slide = _cell(tiny_root, tmp_path)
    present = tmp_path / "slide.svs"
    present.write_bytes(b"\0" * 64)
    extra = {"missing-library": ["--slide-file", str(present)], "no-such-file": ["--slide-file", str(tmp_path / "x.svs")],
             "top-k-without-slide": ["--top-k", "2"], "negative-top-k": ["--top-k", "-1"],
             "no-slide-dir": ["--slide-dir", str(tmp_path / "nowhere")],
             "slide-dir-escape": ["--slide-dir", str(tmp_path), "--slide-ext", "/../../x.svs"]}[case]
    if case == "missing-library":
        for module in ("openslide", "tiffslide"):  # None in sys.modules: the import fails as if not installed
            monkeypatch.setitem(sys.modules, module, None)
    err = _one_line_error(capsys, _run(tmp_path, tiny_root, slide, *extra, "--geojson", str(tmp_path / "a.geojson")))
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "fig").exists() and not (tmp_path / "a.geojson").exists()
    confined.check(tiny_root)


def test_unreadable_slide_is_one_line(confined, capsys, tiny_root, tmp_path):  # noqa: F811
    try:
        slides.slide_backend()
    except slides.SlideLibraryMissing as exc:
        pytest.skip(f"{exc} (make install installs it)")
    _, slide = _cell(tiny_root, tmp_path)
    fake = tmp_path / "broken.svs"
    fake.write_text("not a slide\n")
    err = _one_line_error(capsys, _run(tmp_path, tiny_root, slide, "--slide-file", str(fake)))
    assert err.startswith(f"error: --slide-file {fake}: not a readable slide (")
    assert not (tmp_path / "fig").exists()
    confined.check(tiny_root)


def test_slide_file_and_slide_dir_exclude_each_other(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["plot", "heatmap", "--results", str(tmp_path), "--method", "amil", "--dataset", "blca", "--slide", "s",
              "--slide-file", "a.svs", "--slide-dir", str(tmp_path)])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


class _FakeTiffSlide:
    """tiffslide's API on a 400 x 300 grey image with one dark square (RGB regions, as tiffslide returns)."""

    dimensions = (400, 300)
    level_downsamples = (1.0, 4.0)
    properties = {"tiffslide.objective-power": "40"}

    def __init__(self, path):
        from PIL import Image

        pixels = np.full((300, 400, 3), 200, np.uint8)
        pixels[100:200, 100:200] = 20
        self.image = Image.fromarray(pixels)

    def get_thumbnail(self, size):
        thumb = self.image.copy()
        thumb.thumbnail(size)
        return thumb

    def get_best_level_for_downsample(self, downsample):
        return 1 if downsample >= 4 else 0

    def read_region(self, location, level, size):
        from PIL import Image

        d = self.level_downsamples[level]
        x, y = location
        box = (x, y, x + round(size[0] * d), y + round(size[1] * d))
        return self.image.crop(box).resize(size, Image.Resampling.BOX)

    def close(self):
        pass


def test_tiffslide_is_read_when_openslide_is_absent(monkeypatch, tmp_path):
    import types

    fake = types.ModuleType("tiffslide")
    fake.TiffSlide = _FakeTiffSlide
    fake.PROPERTY_NAME_OBJECTIVE_POWER = "tiffslide.objective-power"
    monkeypatch.setitem(sys.modules, "openslide", None)
    monkeypatch.setitem(sys.modules, "tiffslide", fake)
    (tmp_path / "s.tif").write_bytes(b"II*\0")
    with slides.open_slide(tmp_path / "s.tif") as slide:
        assert slide.backend == "tiffslide" and slide.dimensions == (400, 300) and slide.objective_power == 40
        thumb, scale = slide.thumbnail(200)
        assert thumb.shape == (150, 200, 3) and scale == (0.5, 0.5)
        dark = slide.read_patch(100, 100, 100, 25)  # downsample 4: read from level 1, no resize
        assert dark.shape == (25, 25, 3) and (dark == 20).all()
        edge = slide.read_patch(50, 50, 100, 50)  # level 0, a quarter of it dark
        # (Lanczos resampling rings within a few pixels of the edge at 25, 25)
        assert edge.shape == (50, 50, 3) and (edge[30:, 30:] == 20).all() and (edge[:20] == 200).all()
        with pytest.raises(ValueError, match=r"2 of 3 patch corners of map m lie outside the slide \(400 x 300"):
            slides.check_inside(np.array([[0, 0], [400, 0], [0, 300]]), slide, "map m")

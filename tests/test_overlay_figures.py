"""vizlib.overlay (OpenCV pictures) and vizlib.figures (plotly): geometry is right, figures carry the data."""

from __future__ import annotations

import csv
import io

import cv2
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import models  # noqa: F401 -- registers the bundled demo architectures with timm
from vizlib import figures, overlay
from vizlib.attention import analyse_attention


def peaked_map(grid: tuple[int, int], peak: tuple[int, int], seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).uniform(0.0, 0.5, size=grid)
    values[peak] = 1.0
    return values


def grey(height: int, width: int, level: int = 128) -> np.ndarray:
    return np.full((height, width, 3), level, dtype=np.uint8)


# --- overlay ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "grid", "peak"), [
    ((32, 32), (8, 8), (2, 5)),
    ((224, 224), (14, 14), (13, 0)),
    ((30, 45), (4, 6), (3, 5)),  # crop not a multiple of the grid, non-square
])
def test_brightest_overlay_pixels_lie_in_the_peak_patch(shape: tuple[int, int], grid: tuple[int, int],
                                                          peak: tuple[int, int]) -> None:
    values = peaked_map(grid, peak)
    out = overlay.render_overlay(grey(*shape), values, grid, query=None, alpha=0.7, show_grid=False)
    # inferno is monotonic in brightness, so over a flat grey image the brightest pixels are the peak.
    brightness = out.astype(np.int64).sum(-1)
    ys, xs = np.nonzero(brightness == brightness.max())
    x0, y0, x1, y1 = overlay.patch_box(grid, out.shape[:2], *peak)
    assert len(ys) == (x1 - x0) * (y1 - y0)  # the whole patch, nothing else
    assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1
    top_colour = overlay.colorize(np.ones((1, 1)))[0, 0]
    expected = np.rint(0.7 * top_colour + 0.3 * 128)
    np.testing.assert_allclose(out[ys[0], xs[0]], expected, atol=1)


def test_upsampled_blocks_match_patch_boxes() -> None:
    values = np.arange(12, dtype=float).reshape(3, 4)
    big = overlay.upsample_map(values, (31, 50))
    assert big.shape == (31, 50)
    covered = np.zeros(big.shape, dtype=int)
    for r in range(3):
        for c in range(4):
            x0, y0, x1, y1 = overlay.patch_box((3, 4), big.shape, r, c)
            assert np.all(big[y0:y1, x0:x1] == values[r, c])
            covered[y0:y1, x0:x1] += 1
    assert np.all(covered == 1)  # the boxes tile the image exactly once


def test_pixel_to_patch_round_trips_patch_centres() -> None:
    grid, size = (7, 9), (350, 450)
    for r in range(grid[0]):
        for c in range(grid[1]):
            x0, y0, x1, y1 = overlay.patch_box(grid, size, r, c)
            assert overlay.pixel_to_patch((x0 + x1) / 2, (y0 + y1) / 2, size[1], size[0], grid) == (r, c)
    assert overlay.pixel_to_patch(0, 0, 450, 350, grid) == (0, 0)
    assert overlay.pixel_to_patch(450, 350, 450, 350, grid) == (6, 8)  # far edge clamps into the grid
    assert overlay.pixel_to_patch(-3, 999, 450, 350, grid) == (6, 0)
    with pytest.raises(ValueError):
        overlay.pixel_to_patch(1, 1, 0, 10, grid)


def test_query_marker_outlines_exactly_its_patch() -> None:
    image = grey(80, 80)
    out = overlay.draw_marker(image, (4, 4), 1, 2)
    x0, y0, x1, y1 = overlay.patch_box((4, 4), (80, 80), 1, 2)
    changed = np.any(out != image, axis=-1)
    ys, xs = np.nonzero(changed)
    assert ys.min() == y0 and ys.max() == y1 - 1 and xs.min() == x0 and xs.max() == x1 - 1
    assert tuple(out[y0, x0]) == overlay.MARKER_COLOUR
    assert tuple(out[(y0 + y1) // 2, (x0 + x1) // 2]) == (128, 128, 128)  # the inside stays visible


def test_grid_lines_are_drawn_on_patch_borders() -> None:
    out = overlay.draw_grid(grey(64, 64, 0), (4, 4))
    assert out[16, 5].sum() > 0 and out[5, 32].sum() > 0  # a horizontal and a vertical line
    assert out[8, 8].sum() == 0  # patch interiors untouched


def test_render_overlay_upscales_small_crops_by_an_integer_factor() -> None:
    out = overlay.render_overlay(grey(32, 32), np.ones((8, 8)), (8, 8), query=(0, 0))
    assert out.shape == (384, 384, 3) and out.dtype == np.uint8
    assert overlay.display_scale((224, 224)) == 2
    assert overlay.display_scale((500, 300)) == 1


def test_encode_png_keeps_rgb_order() -> None:
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[..., 0] = 255  # pure red
    image[1, 2] = (0, 0, 255)
    png = overlay.encode_png(image)
    assert png.startswith(b"\x89PNG")
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    np.testing.assert_array_equal(decoded, image)


def test_encode_jpeg_is_a_decodable_jpeg() -> None:
    image = np.zeros((16, 24, 3), dtype=np.uint8)
    image[..., 0] = 200
    jpeg = overlay.encode_jpeg(image)
    assert jpeg.startswith(b"\xff\xd8")
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    assert decoded.shape == (16, 24, 3) and abs(decoded[..., 0].mean() - 200) < 3 and decoded[..., 2].mean() < 3


def test_tile_places_images_row_by_row() -> None:
    tiles = [np.full((10, 20, 3), i * 40, dtype=np.uint8) for i in range(5)]
    canvas = overlay.tile(tiles, cols=3, pad=2)
    assert canvas.shape == (2 * 10 + 3 * 2, 3 * 20 + 4 * 2, 3)
    assert np.all(canvas[2:12, 2:22] == 0)
    assert np.all(canvas[14:24, 24:44] == 4 * 40)  # fifth tile: row 1, column 1
    assert np.all(canvas[14:24, 46:66] == 255)  # empty slot keeps the background
    labelled = overlay.label(tiles[0], "head 1")
    assert labelled.shape[0] > 10 and labelled.shape[1] == 20


def test_normalise_colorize_and_input_checks() -> None:
    assert np.all(overlay.normalise(np.full((2, 2), 3.0)) == 0)
    np.testing.assert_allclose(overlay.normalise(np.array([[0.0, 2.0], [1.0, 4.0]]), vmin=0, vmax=2),
                               [[0, 1], [0.5, 1]])
    assert overlay.colorize(np.zeros((2, 2)), "viridis").shape == (2, 2, 3)
    with pytest.raises(ValueError, match="colormap"):
        overlay.colorize(np.zeros((2, 2)), "rainbow-unicorn")
    with pytest.raises(ValueError, match="map"):
        overlay.as_map(np.zeros((2, 2, 2)))
    assert overlay.as_map(torch.ones(2, 3)).shape == (2, 3)


def test_relative_patch_and_spread_queries() -> None:
    assert overlay.relative_patch((4, 4), (8, 8), (14, 14)) == (7, 7)
    assert overlay.relative_patch((7, 0), (8, 8), (14, 14)) == (13, 0)
    assert overlay.relative_patch((0, 13), (14, 14), (8, 8)) == (0, 7)
    assert overlay.relative_layer(8, 8, 12) == 12 and overlay.relative_layer(1, 12, 8) == 1
    assert overlay.relative_layer(4, 8, 12) == 6 and overlay.relative_layer(5, 8, 8) == 5
    queries = overlay.spread_queries((8, 8), (2, 2), 4)
    assert queries[0] == (2, 2) and len(set(queries)) == 4
    assert all(0 <= r < 8 and 0 <= c < 8 for r, c in queries)
    assert overlay.spread_queries((1, 1), (0, 0), 4) == [(0, 0)]


# --- figures ---------------------------------------------------------------------------------------


def _heatmaps(fig: object) -> list:
    return [t for t in fig.data if t.type == "heatmap"]  # type: ignore[attr-defined]


def test_heatmap_over_image_carries_the_map_on_patch_centres() -> None:
    values = peaked_map((8, 8), (1, 6))
    fig = figures.heatmap_over_image(grey(32, 32), values, query=(1, 6), title="layer 8")
    (image,) = [t for t in fig.data if t.type == "image"]
    (heat,) = _heatmaps(fig)
    np.testing.assert_array_equal(np.asarray(heat.z), values)
    assert image.source.startswith("data:image/jpeg;base64,")
    assert (heat.x0, heat.dx, heat.y0, heat.dy) == (2.0, 4.0, 2.0, 4.0)  # patch 4 px: centres at 2, 6, ...
    (rect,) = fig.layout.shapes
    assert (rect.x0, rect.x1, rect.y0, rect.y1) == (24.0, 28.0, 4.0, 8.0)
    assert heat.text[1][6] == "row 1, col 6"


def test_colour_range_with_one_end_gets_both() -> None:
    fig = figures.heatmap_over_image(grey(16, 16), np.full((4, 4), 0.25) + np.eye(4) * 0.5, zmin=0.0)
    assert fig.layout.coloraxis.cmin == 0.0 and fig.layout.coloraxis.cmax == pytest.approx(0.75)


def test_heads_grid_has_one_trace_per_head_on_a_shared_scale() -> None:
    maps = np.random.default_rng(1).random((6, 8, 8))
    fig = figures.heads_grid(grey(32, 32), maps, query=(3, 3))
    heats = _heatmaps(fig)
    assert len(heats) == 6
    for index, heat in enumerate(heats):
        np.testing.assert_array_equal(np.asarray(heat.z), maps[index])
        assert heat.coloraxis == "coloraxis"
    assert fig.layout.coloraxis.cmax == pytest.approx(maps.max())
    assert len(fig.layout.shapes) == 6  # the query is outlined in every head
    with pytest.raises(ValueError):
        figures.heads_grid(grey(32, 32), maps[0])


def test_query_grid_is_layers_by_queries() -> None:
    maps = np.random.default_rng(2).random((3, 4, 8, 8))
    queries = [(0, 0), (2, 2), (4, 4), (7, 7)]
    fig = figures.query_grid(grey(32, 32), maps, queries=queries, row_titles=["layer 1", "layer 4", "layer 8"])
    heats = _heatmaps(fig)
    assert len(heats) == 12
    np.testing.assert_array_equal(np.asarray(heats[5].z), maps[1, 1])  # row-major: layer 4, query (2, 2)
    assert heats[5].zmax == pytest.approx(maps[1].max())
    titles = [a.text for a in fig.layout.annotations]
    assert "query (7, 7)" in titles and "layer 8" in titles
    with pytest.raises(ValueError):
        figures.query_grid(grey(32, 32), maps, queries=queries[:3], row_titles=["a", "b", "c"])


def test_metric_curves_plot_every_metric_of_every_model() -> None:
    rng = np.random.default_rng(3)
    curves = {name: {m: list(rng.random(8)) for m in figures.METRIC_ORDER} for name in ("plain", "distilled")}
    per_head = {"plain": {"entropy": rng.random((8, 6))}}
    fig = figures.metric_curves(curves, per_head=per_head)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 2 * len(figures.METRIC_ORDER)
    assert [t.showlegend for t in lines].count(True) == 2  # one legend entry per model
    plain_qi = next(t for t in lines if t.name == "plain" and t.xaxis == "x")
    np.testing.assert_allclose(plain_qi.y, curves["plain"]["query_independence"])
    assert list(plain_qi.x) == list(range(1, 9))
    (dots,) = [t for t in fig.data if t.mode == "markers"]
    np.testing.assert_allclose(dots.y, per_head["plain"]["entropy"].reshape(-1))
    titles = {a.text for a in fig.layout.annotations}
    assert {figures.METRIC_LABELS[m] for m in figures.METRIC_ORDER} <= titles


def test_rollout_figure_is_divided_by_its_maximum() -> None:
    rollout = np.random.default_rng(4).random((8, 8)) * 0.1
    (heat,) = _heatmaps(figures.rollout_figure(grey(32, 32), rollout))
    np.testing.assert_allclose(np.asarray(heat.z), rollout / rollout.max())


def test_figure_html_is_standalone() -> None:
    html = figures.figure_html(figures.heatmap_over_image(grey(8, 8), np.eye(2)))
    assert html.lstrip().lower().startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert "<script src=" not in html and len(html) > 1_000_000  # plotly.js inlined: opens offline
    assert "Plotly.newPlot" in html


def test_sentences_read_out_the_numbers() -> None:
    curves = {m: [0.5] * 8 for m in figures.METRIC_ORDER}
    curves["query_independence"] = [0.42, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.91]
    curves["entropy"] = [0.9] + [0.8] * 6 + [0.35]
    text = figures.trend_sentence(curves, "vit_cifar")
    assert "query-independence rises from 0.42 in layer 1 to 0.91 in layer 8" in text
    assert "entropy falls from 0.90 in layer 1 to 0.35 in layer 8" in text
    assert "top-5% mass stays at 0.50" in text
    assert "more query-independent than the first, but not sparser" in text
    curves["topk_mass"] = [0.1] * 7 + [0.3]
    assert "as the paper observed" in figures.trend_sentence(curves, "vit_cifar")
    other = {**curves, "entropy": [0.9] * 8}
    both = figures.comparison_sentence({"plain": curves, "distilled": other})
    assert "plain 0.35, distilled 0.90" in both and "distilled attends most smoothly" in both
    assert "equally" in figures.comparison_sentence({"a": curves, "b": curves})


def test_prediction_text_and_csv() -> None:
    text = figures.prediction_text(torch.tensor([0.0, 3.0, 1.0]), ["cat", "dog", "frog"], k=2)
    assert text == "dog 84%, frog 11%"
    tiny = figures.prediction_text(torch.tensor([0.0, 9.0]), ["tabby, tabby cat", "tiger cat"], k=2)
    assert tiny == "tiger cat 100%, tabby 0.0%"
    rows = [{"layer": 0, "head": 0, "entropy": 0.5}, {"layer": 0, "head": 1, "entropy": 0.25, "model": "m"}]
    parsed = list(csv.DictReader(io.StringIO(figures.table_csv(rows))))
    assert parsed[1] == {"layer": "0", "head": "1", "entropy": "0.25", "model": "m"}
    assert parsed[0]["model"] == ""


def test_figures_of_a_real_analysis_carry_its_maps() -> None:
    torch.manual_seed(0)
    model = timm.create_model("deit_cifar_distilled").eval()  # 2 prefix tokens: grid must not be sqrt(N-1)
    analysis = analyse_attention(model, torch.randn(1, 3, 32, 32))
    maps = analysis.head_maps(7, 9)
    fig = figures.heads_grid(grey(32, 32), maps, query=(1, 1))
    for heat, expected in zip(_heatmaps(fig), maps, strict=True):
        np.testing.assert_allclose(np.asarray(heat.z), expected.numpy(), rtol=1e-6)
        assert np.asarray(heat.z).shape == (8, 8)
    picture = overlay.render_overlay(grey(32, 32), analysis.query_map(7, None, 9), analysis.grid, (1, 1))
    assert picture.shape == (384, 384, 3)
    curves = figures.metric_curves({"deit": analysis.layer_means()})
    assert len([t for t in curves.data if t.mode == "lines+markers"]) == len(figures.METRIC_ORDER)
    assert cv2.imdecode(np.frombuffer(overlay.encode_png(picture), np.uint8), cv2.IMREAD_COLOR).shape == (384, 384, 3)

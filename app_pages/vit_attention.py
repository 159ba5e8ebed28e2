"""ViT attention: is deep-layer attention query-independent and sparse, as FCViT observed?

Story: pick a model (sidebar), run it once on the sidebar image, then click patches, layers and heads
freely: every view below is a lookup in the cached analysis, never a new forward pass.
"""

from __future__ import annotations

import streamlit as st

from ui import models, sidebar, widgets
from vizlib import attention, figures, overlay
from vizlib.attention import AttentionAnalysis
from vizlib.weights import HUB_MODELS, LoadedModel

BUNDLED = ("vit_cifar", "deit_cifar_distilled")
PLAIN, DISTILLED = BUNDLED
MEAN_OF_HEADS = "mean of heads"
CLAIM = (
    "**Paper.** FCViT (*A Close Look at Spatial Modeling: From Attention to Convolution*) observes that in "
    "the deep layers of a ViT every query patch attends to nearly the same few patches: attention becomes "
    "**query-independent** and **sparse**, while DeiT-B distilled is reported to attend more smoothly."
)


def other_bundled(name: str) -> str:
    return PLAIN if "distilled" in name else DISTILLED


def analyse(
    choice: models.ModelChoice, image: sidebar.ImageChoice
) -> tuple[models.Forward, models.ModelChoice, LoadedModel]:
    """Load (falling back to bundled weights) and run once; a model without attention stops the page."""
    fallback = models.ModelChoice(choice.name if choice.name in BUNDLED else PLAIN, "bundled")
    if "distilled" in choice.name and choice.name not in BUNDLED:
        fallback = models.ModelChoice(DISTILLED, "bundled")
    forward, used, loaded = models.analyse_or_stop("attention", image, choice, fallback, attention.analyse_attention)
    return forward, used, loaded


def model_label(choice: models.ModelChoice) -> str:
    return choice.name if choice.weights == "bundled" else choice.label


def follow_model_change(grid: tuple[int, int], depth: int) -> None:
    """Another model (grid, depth): keep the query at the same place and the layer at the same depth."""
    state = st.session_state
    old_grid, old_depth = state.get("vit_grid"), state.get("vit_depth")
    if old_grid and tuple(old_grid) != grid and "vit_row" in state and "vit_col" in state:
        state["vit_row"], state["vit_col"] = overlay.relative_patch((state["vit_row"], state["vit_col"]),
                                                                    old_grid, grid)
    if old_depth and old_depth != depth and "vit_layer" in state:
        state["vit_layer"] = overlay.relative_layer(state["vit_layer"], old_depth, depth)
    state["vit_grid"], state["vit_depth"] = grid, depth


def query_panel(
    result: AttentionAnalysis, crop: object, label: str, class_names: list[str]
) -> tuple[int, int, int, int | None]:
    """Clickable overlay, query/layer/head pickers and readout; returns (row, col, layer, head)."""
    h, w = result.grid
    depth, heads = len(result.layers), result.num_heads
    follow_model_change((h, w), depth)
    widgets.clamp_state("vit_row", 0, h - 1, h // 2)
    widgets.clamp_state("vit_col", 0, w - 1, w // 2)
    widgets.clamp_state("vit_layer", 1, depth, depth)
    head_options = [MEAN_OF_HEADS] + [f"head {i + 1}" for i in range(heads)]
    if st.session_state.get("vit_head") not in head_options:
        st.session_state["vit_head"] = MEAN_OF_HEADS
    picture, controls = st.columns([3, 2])
    with controls:
        row_input, col_input = st.columns(2)
        row = int(row_input.number_input("Query row", 0, h - 1, step=1, key="vit_row"))
        col = int(col_input.number_input("Query column", 0, w - 1, step=1, key="vit_col"))
        layer = int(st.slider("Layer", 1, depth, key="vit_layer")) if depth > 1 else 1
        head_label = st.selectbox("Head", head_options, key="vit_head")
        head = None if head_label == MEAN_OF_HEADS else head_options.index(head_label) - 1
        st.markdown(f"**Query patch: row {row}, column {col}** of the {h}×{w} grid · layer {layer} · "
                    f"{head_label}")
        st.caption(f"{label} predicts: {figures.prediction_text(result.logits, class_names)}")
    values = result.query_map(layer - 1, head, row * w + col)
    with picture:
        image = overlay.render_overlay(crop, values, result.grid, (row, col), vmin=0.0)
        widgets.clickable_patches(image, (h, w), key="vit_click", row_key="vit_row", col_key="vit_col")
        st.caption("Click a patch to make it the query. Colour: how much the query (cyan box) attends to "
                   "each patch in this layer.")
        widgets.downloads(f"attention_L{layer}_q{row}-{col}", overlay.encode_png(image),
                  figures.heatmap_over_image(crop, values, query=(row, col), zmin=0.0,
                                             title=f"{label}, layer {layer}, query ({row}, {col})"))
    return row, col, layer, head


def heads_tab(result: AttentionAnalysis, crop: object, row: int, col: int, layer: int) -> None:
    maps = result.head_maps(layer - 1, row * result.grid[1] + col)
    titles = [f"head {i + 1}" for i in range(maps.shape[0])]
    fig = figures.heads_grid(crop, maps, query=(row, col), titles=titles)
    st.plotly_chart(fig, key="vit_heads_fig")
    tiles = [overlay.label(overlay.render_overlay(crop, m, result.grid, (row, col), min_side=192,
                                                  vmin=0.0, vmax=float(maps.max())), t)
             for m, t in zip(maps, titles, strict=True)]
    widgets.downloads(f"heads_L{layer}_q{row}-{col}", overlay.encode_png(overlay.tile(tiles, cols=6)), fig)


def paper_tab(result: AttentionAnalysis, crop: object, row: int, col: int) -> None:
    depth = len(result.layers)
    defaults = sorted({1, (depth + 1) // 2, depth})
    layers = st.multiselect("Layers (rows)", list(range(1, depth + 1)), default=defaults, key="vit_paper_layers")
    layers = sorted(layers) or [depth]
    queries = overlay.spread_queries(result.grid, (row, col), 4)
    index = [r * result.grid[1] + c for r, c in queries]
    maps = [[result.query_map(layer - 1, None, q) for q in index] for layer in layers]
    row_titles = [f"layer {layer}" for layer in layers]
    fig = figures.query_grid(crop, [[m.numpy() for m in ms] for ms in maps], queries=queries, row_titles=row_titles)
    st.plotly_chart(fig, key="vit_paper_fig")
    st.caption("Paper view: each row is a layer, each column a query patch (cyan). Where a row looks the same "
               "in every column, that layer's attention is query-independent. Mean of heads.")
    tiles = [overlay.label(overlay.render_overlay(crop, m, result.grid, q, min_side=192, vmin=0.0), f"L{layer} q{q}")
             for layer, ms in zip(layers, maps, strict=True) for m, q in zip(ms, queries, strict=True)]
    widgets.downloads(f"queries_q{row}-{col}", overlay.encode_png(overlay.tile(tiles, cols=len(queries))), fig)


def metrics_tab(results: dict[str, AttentionAnalysis]) -> None:
    curves = {label: r.layer_means() for label, r in results.items()}
    per_head = {label: {m: [v[m].numpy() for v in r.layer_metrics] for m in figures.METRIC_ORDER
                        if m != "head_independence"} for label, r in results.items()}
    fig = figures.metric_curves(curves, per_head=per_head)
    st.plotly_chart(fig, key="vit_metrics_fig")
    st.caption(" · ".join(f"**{figures.METRIC_LABELS[m]}**: {figures.METRIC_HINTS[m]}" for m in figures.METRIC_ORDER)
               + ". Lines: mean over heads; dots: single heads.")
    rows = [{"model": label, **row} for label, r in results.items() for row in r.metric_table()]
    widgets.downloads("attention_metrics", fig=fig, csv=figures.table_csv(rows))


def rollout_tab(result: AttentionAnalysis, crop: object) -> None:
    if result.rollout is None:
        st.info("This model has no rollout.")
        return
    fig = figures.rollout_figure(crop, result.rollout)
    st.plotly_chart(fig, key="vit_rollout_fig")
    st.caption("Attention rollout (Abnar & Zuidema): attention multiplied through all layers, read from the "
               "class token, divided by its maximum.")
    png = overlay.render_overlay(crop, result.rollout, result.grid, show_grid=False, vmin=0.0)
    widgets.downloads("rollout", overlay.encode_png(png), fig)


def side_by_side(first: tuple[str, AttentionAnalysis, object], second: tuple[str, AttentionAnalysis, object],
                 row: int, col: int, layer: int) -> None:
    """The same query (mapped by position) at the same relative depth, head mean, in both models."""
    st.subheader("Two models side by side")
    tiles = []
    for column, (label, result, crop) in zip(st.columns(2), (first, second), strict=True):
        at = overlay.relative_layer(layer, len(first[1].layers), len(result.layers))
        q = overlay.relative_patch((row, col), first[1].grid, result.grid)
        values = result.query_map(at - 1, None, q[0] * result.grid[1] + q[1])
        column.plotly_chart(figures.heatmap_over_image(crop, values, query=q, title=f"{label}: layer {at}",
                                                       height=360, zmin=0.0), key=f"vit_pair_{label}")
        tiles.append(overlay.label(overlay.render_overlay(crop, values, result.grid, q, min_side=256, vmin=0.0),
                                   f"{label} L{at}"))
    curves = {first[0]: first[1].layer_means(), second[0]: second[1].layer_means()}
    st.markdown(figures.comparison_sentence(curves))
    widgets.downloads(f"two_models_L{layer}_q{row}-{col}", overlay.encode_png(overlay.tile(tiles, cols=2)))


# --- the page ------------------------------------------------------------------------------------

st.title("ViT attention")
st.markdown(CLAIM)
image = sidebar.require_image()
options = {**models.bundled_options(BUNDLED), **HUB_MODELS}
choice = models.model_picker(options, key="vit_model", default=PLAIN)
compare = st.sidebar.toggle("Compare with a second model", key="vit_compare")
second = models.model_picker(options, key="vit_model_b", default=other_bundled(choice.name),
                             title="Second model") if compare else None

forward, used, loaded = analyse(choice, image)
result: AttentionAnalysis = forward.result
label = model_label(used)
curves = result.layer_means()
st.markdown(f"**This model, this image.** {figures.trend_sentence(curves, label)}")
if used.weights == "bundled" and (loaded.checkpoint is None or loaded.checkpoint.test_accuracy is None):
    st.caption(f"{loaded.weights}: no test accuracy is recorded for these weights, so read the numbers "
               "as a demonstration of the measurements, not of a trained model.")
else:
    st.caption(f"Weights: {loaded.weights}.")

row, col, layer, head = query_panel(result, forward.crop, label, loaded.class_names)

results = {label: result}
if second is not None:
    forward_b, used_b, _ = analyse(second, image)
    label_b = model_label(used_b)
    if label_b == label:
        label_b += " (second)"
    results[label_b] = forward_b.result
    side_by_side((label, result, forward.crop), (label_b, forward_b.result, forward_b.crop), row, col, layer)

widgets.run_open_tab({
    "All heads": lambda: heads_tab(result, forward.crop, row, col, layer),
    "Several queries (paper view)": lambda: paper_tab(result, forward.crop, row, col),
    "Metrics per layer": lambda: metrics_tab(results),
    "Rollout": lambda: rollout_tab(result, forward.crop),
}, key="vit_tab")

"""MOAT window vs global: does window attention plus MBConv keep MOAT's global reach?

Story: pick a model and a window size (sidebar); the same weights run once globally and once in
windows (a per-call mode, the shared model is never switched). Block and head pickers are lookups in
that cached analysis; a new query computes its receptive field once (one backward pass per block)
and caches it too.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from ui import models, sidebar, widgets
from vizlib import figures, overlay
from vizlib import moat_view as mv
from vizlib.moat_view import MoatAnalysis, ReceptiveField
from vizlib.weights import LoadedModel

BUNDLED = "moat_cifar"
# Official weights are TensorFlow checkpoints: convert with scripts/convert_moat_tf.py, then upload.
OFFICIAL = ("moat_0", "moat_1", "moat_2", "moat_3", "moat_4",
            "tiny_moat_0", "tiny_moat_1", "tiny_moat_2", "tiny_moat_3")
WINDOWS: dict[str, mv.WindowSpec] = {"stage defaults": None, **{f"{w}×{w}": w for w in (2, 3, 4, 7, 8, 14)}}
MEAN_OF_HEADS = "mean of heads"
BARELY_TRAINED = 50.0  # test accuracy (%) below which the page warns that the weights are a demo
CLAIM = (
    "**Paper.** MOAT (*Alternating Mobile Convolution and Attention*, ICLR 2023) puts an MBConv in front of "
    "every attention layer. With **window attention** a token only attends inside its window, yet MOAT "
    "keeps a **global reach**: the MBConv's 3×3 depthwise convolution mixes neighbouring tokens across "
    "window borders, so information still flows from window to window."
)


def analyse(choice: models.ModelChoice, image: sidebar.ImageChoice,
            window: mv.WindowSpec) -> tuple[models.Forward, models.ModelChoice, LoadedModel]:
    """Load (official variants need an uploaded file; otherwise the bundled model) and run both modes once."""
    fallback = models.ModelChoice(BUNDLED, "bundled")
    if choice.weights not in ("bundled", "file"):
        st.info(f"{choice.name} has no bundled weights: convert the official TensorFlow checkpoint with "
                "`scripts/convert_moat_tf.py` and upload it under *Use your own checkpoint*. Showing the "
                "bundled model meanwhile.")
        choice = fallback
    forward, used, loaded = models.analyse_or_stop(
        f"moat:{mv.window_label(window)}", image, choice, fallback,
        lambda model, x: mv.analyse_moat(model, x, window),
    )
    return forward, used, loaded


def receptive(image: sidebar.ImageChoice, used: models.ModelChoice, loaded: LoadedModel,
              window: mv.WindowSpec, query: tuple[int, int]) -> ReceptiveField:
    """The query's receptive fields, once per (image, model, window, query)."""
    what = f"moat-rf:{mv.window_label(window)}:{query[0]},{query[1]}"
    return models.forward_once(what, image, used, loaded,
                               lambda model, x: mv.receptive_field(model, x, window, query)).result


def pickers(result: MoatAnalysis) -> tuple[int, int, int, int | None]:
    """Query (reference grid), block and head; session state clamped to this model's grids."""
    h, w = result.reference_grid
    widgets.clamp_state("moat_row", 0, h - 1, h // 2)
    widgets.clamp_state("moat_col", 0, w - 1, w // 2)
    if st.session_state.get("moat_block") not in result.block_names:
        st.session_state["moat_block"] = result.block_names[-1]
    names = {b.name: f"{b.name} ({b.grid[0]}×{b.grid[1]} tokens, window {b.window[0]}×{b.window[1]})"
             for b in result.blocks}
    row_input, col_input = st.columns(2)
    row = int(row_input.number_input("Query row", 0, h - 1, step=1, key="moat_row"))
    col = int(col_input.number_input("Query column", 0, w - 1, step=1, key="moat_col"))
    name = st.selectbox("MOAT block", result.block_names, key="moat_block", format_func=names.__getitem__)
    block = result.block_names.index(name)
    heads = result.blocks[block].num_heads
    head_options = [MEAN_OF_HEADS] + [f"head {i + 1}" for i in range(heads)]
    if st.session_state.get("moat_head") not in head_options:
        st.session_state["moat_head"] = MEAN_OF_HEADS
    head_label = st.selectbox("Head", head_options, key="moat_head")
    head = None if head_label == MEAN_OF_HEADS else head_options.index(head_label) - 1
    return row, col, block, head


def percent(share: float) -> str:
    return f"{100 * share:.0f}%" if share >= 0.095 or share == 0 else f"{100 * share:.1f}%"


def field_picture(result: MoatAnalysis, field: ReceptiveField, crop: np.ndarray, block: int,
                  query: tuple[int, int]) -> np.ndarray:
    """Window-mode image gradient of the query at ``block``, reference grid, query and its window drawn."""
    view, rf = result.blocks[block], field.blocks[block]
    picture = overlay.render_overlay(crop, rf.modes["window"].image, result.reference_grid, query, vmin=0.0)
    return mv.draw_windows(picture, view.grid, view.window, rf.bounds)


def attention_pair(result: MoatAnalysis, field: ReceptiveField, crop: np.ndarray, block: int,
                   head: int | None) -> None:
    """The query's attention row in both modes, window borders drawn, with the mass outside its window."""
    view, rf = result.blocks[block], field.blocks[block]
    tiles = []
    for column, mode in zip(st.columns(2), ("global", "window"), strict=True):
        values = result.query_map(block, rf.query, head, mode)
        r0, r1, c0, c1 = rf.bounds
        outside = 1.0 - float(values[r0:r1, c0:c1].sum() / values.sum().clamp_min(1e-12))
        picture = mv.draw_windows(overlay.render_overlay(crop, values, view.grid, rf.query, vmin=0.0),
                                  view.grid, view.window, rf.bounds)
        column.image(picture, caption=f"{mode} attention of query ({rf.query[0]}, {rf.query[1]}) in "
                     f"{view.name}: {percent(outside)} of it outside the query's window (green box).")
        tiles.append(overlay.label(picture, f"{mode} {view.name}"))
    widgets.downloads(f"moat_attention_{view.name}_q{rf.query[0]}-{rf.query[1]}",
                      overlay.encode_png(overlay.tile(tiles, cols=2)))


def tables(result: MoatAnalysis, field: ReceptiveField) -> None:
    rows = [{**row, "feature difference (window vs global)": view.feature_difference}
            for row, view in zip(field.table(), result.blocks, strict=True)]
    st.dataframe(rows, hide_index=True,
                 column_config={k: st.column_config.NumberColumn(format="percent") for k in rows[0]
                                if k not in ("block", "query")})
    st.caption("Share of the query's gradient mass outside its window, per MOAT block: w.r.t. the attention "
               "input (what attention alone can reach), the block input (adds this block's MBConv) and the "
               "image (adds every earlier layer); global mode for comparison. Last column: "
               "‖window − global‖ / ‖global‖ of the block output.")
    stages = ", ".join(f"stage {i}: {percent(d)}" for i, d in enumerate(result.stage_difference))
    st.caption(f"Relative feature difference per stage: {stages}; pooled features: "
               f"{percent(result.final_difference)}.")
    widgets.downloads(f"moat_windows_{result.window_text}", csv=figures.table_csv(rows))


def numbers_sentence(result: MoatAnalysis, field: ReceptiveField, block: int) -> str:
    rf = field.blocks[block]
    win, glob = rf.modes["window"].outside, rf.modes["global"].outside
    reach = max((b.modes["window"].outside["block_input"] for b in field.blocks), default=0.0)
    verdict = ("so the MBConv does carry information across window borders, as the paper argues"
               if reach > 0.01 else "so on these weights the MBConv carries almost nothing across window borders")
    return (
        f"**This model, this image.** At {rf.name}, attention alone keeps the query's gradient inside its window "
        f"({percent(win['attention_input'])} outside, exactly 0 by construction); measured from the block input "
        f"{percent(win['block_input'])} lies outside, and from the image {percent(win['image'])} (global attention: "
        f"{percent(glob['image'])}). Over all MOAT blocks up to {percent(reach)} of the block-input gradient "
        f"crosses the window border, {verdict}."
    )


# --- the page ------------------------------------------------------------------------------------

st.title("MOAT window vs global")
st.markdown(CLAIM)
image = sidebar.require_image()
options = {**models.bundled_options((BUNDLED,)),
           **{name: "ImageNet, converted official weights from a file" for name in OFFICIAL}}
choice = models.model_picker(options, key="moat_model", default=BUNDLED)
if st.session_state.get("moat_window") not in WINDOWS:
    st.session_state["moat_window"] = "stage defaults"
window_text = st.sidebar.selectbox("Window (every MOAT stage)", list(WINDOWS), key="moat_window")
window = WINDOWS[window_text]

forward, used, loaded = analyse(choice, image, window)
result: MoatAnalysis = forward.result
accuracy = loaded.checkpoint.test_accuracy if loaded.checkpoint is not None else None
if accuracy is not None and accuracy < BARELY_TRAINED:
    st.warning(f"Weights: {loaded.weights}. These weights are barely trained ({accuracy:.1f}% test accuracy; "
               "chance is 10%), so read the numbers as a demonstration of the measurements, not of a trained MOAT.")
else:
    st.caption(f"Weights: {loaded.weights}.")
if result.all_windows_global:
    st.info("At this input size every window covers its whole map, so window and global attention coincide; "
            "pick a smaller window in the sidebar.")
st.caption(f"Prediction, global attention: {figures.prediction_text(result.logits_global, loaded.class_names)} · "
           f"window attention ({result.window_text}): "
           f"{figures.prediction_text(result.logits_window, loaded.class_names)}")

picture_column, controls = st.columns([3, 2])
with controls:
    row, col, block, head = pickers(result)
field = receptive(image, used, loaded, window, (row, col))
view = result.blocks[block]
with controls:
    shares = field.blocks[block].modes["window"].outside
    st.markdown(f"**Query: row {row}, column {col}** of the {result.reference_grid[0]}×{result.reference_grid[1]} "
                f"grid · {view.name} · windows {view.window[0]}×{view.window[1]}")
    st.markdown(f"Gradient mass outside the query's window (window mode): attention input "
                f"{percent(shares['attention_input'])}, block input {percent(shares['block_input'])}, image "
                f"{percent(shares['image'])}.")
with picture_column:
    picture = field_picture(result, field, forward.crop, block, (row, col))
    widgets.clickable_patches(picture, result.reference_grid, key="moat_click", row_key="moat_row",
                              col_key="moat_col")
    st.caption("Click a patch to make it the query (cyan). Colour: how much each image pixel moves the query's "
               f"output feature at {view.name} in window mode (gradient mass); green: window borders, the "
               "query's window thicker.")
    widgets.downloads(f"moat_field_{view.name}_q{row}-{col}", overlay.encode_png(picture))

st.markdown(numbers_sentence(result, field, block))
attention_pair(result, field, forward.crop, block, head)
tables(result, field)

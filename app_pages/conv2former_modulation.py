"""Conv2Former modulation: A, V and A⊙V per block, the kernel footprint for k = 7 and 11, and ViT attention.

Story: the model runs once on the sidebar image (maps and footprints, cached per image, model and
weights); block, channel-group, map and stage pickers only look results up.
"""

from __future__ import annotations

import math

import streamlit as st
import torch
import torch.nn.functional as F

from ui import models, sidebar, widgets
from vizlib import conv2former_view, figures, overlay, weights
from vizlib.conv2former_view import Conv2FormerAnalysis, ModulationMaps
from vizlib.weights import HUB_MODELS, LoadedModel

BUNDLED = "conv2former_cifar"
OFFICIAL = {name: "official weights: upload the file below" for name in
            ("conv2former_n", "conv2former_t", "conv2former_s", "conv2former_b", "conv2former_b_22k",
             "conv2former_l")}
VIT_BUNDLED = ("vit_cifar", "deit_cifar_distilled")
ALL_CHANNELS = "all channels"
DISPLAY_SIDE = 64  # footprints are per input pixel: pool 224-px maps so the browser gets a light figure
CLAIM = (
    "**Paper.** Conv2Former (*A Simple Transformer-Style ConvNet for Visual Recognition*) replaces "
    "self-attention by **convolutional modulation**: A = DW k×k(GELU(1×1(x))) from a large-kernel depthwise "
    "convolution multiplies the values V = 1×1(x) position by position, out = 1×1(A⊙V). Like attention, A "
    "reweights every position's value from its neighbourhood, without an N×N map; larger kernels (7 → 11) "
    "are reported to help."
)


def run_conv2former(choice: models.ModelChoice, image: sidebar.ImageChoice) -> tuple[models.Forward, str, LoadedModel]:
    fallback = models.ModelChoice(BUNDLED, "bundled")
    if choice.weights != "file" and weights.find_checkpoint(choice.name) is None:
        st.info(f"{choice.name} has no bundled weights: upload its official checkpoint under "
                f"“Use your own checkpoint” in the sidebar. Showing {BUNDLED} meanwhile.")
        choice = fallback
    forward, used, loaded = models.analyse_or_stop("conv2former", image, choice, fallback,
                                                   conv2former_view.analyse_conv2former)
    st.caption(f"Weights: {loaded.weights}. {used.name} predicts: "
               f"{figures.prediction_text(forward.result.logits, loaded.class_names)}.")
    return forward, used.name if used.weights == "bundled" else used.label, loaded


def group_label(maps: ModulationMaps, group: int) -> str:
    start = sum(maps.group_sizes[:group])
    return f"group {group + 1} (channels {start}–{start + maps.group_sizes[group] - 1})"


def pick_block(result: Conv2FormerAnalysis) -> tuple[ModulationMaps, int | None]:
    names = [b.name for b in result.blocks]
    if st.session_state.get("c2f_block") not in names:
        st.session_state["c2f_block"] = names[0]
    block_col, group_col = st.columns(2)
    name = block_col.selectbox("Block", names, key="c2f_block", format_func=lambda n: result.block(n).label)
    maps = result.block(name)
    groups = [ALL_CHANNELS] + [group_label(maps, g) for g in range(len(maps.group_sizes))]
    if st.session_state.get("c2f_group") not in groups:
        st.session_state["c2f_group"] = ALL_CHANNELS
    picked = group_col.selectbox("Channels", groups, key="c2f_group")
    return maps, None if picked == ALL_CHANNELS else groups.index(picked) - 1


def maps_panel(maps: ModulationMaps, group: int | None, crop: object) -> None:
    who = ALL_CHANNELS if group is None else f"group {group + 1}"
    tiles = []
    for column, (kind, title) in zip(st.columns(3), conv2former_view.KINDS.items(), strict=True):
        values = maps.channel_mean(kind) if group is None else maps.maps(kind)[group]
        fig = figures.heatmap_over_image(crop, values, title=title.split(" (")[0], height=330, zmin=0.0,
                                         colorbar_title="mean |.|")
        column.plotly_chart(fig, key=f"c2f_{kind}_fig")
        tiles.append(overlay.label(overlay.render_overlay(crop, values, maps.grid, show_grid=False, vmin=0.0,
                                                          min_side=256), title.split(" (")[0]))
    st.markdown(conv2former_view.modulation_sentence(maps))
    st.caption(f"{maps.label}, {who}: mean absolute value over the channels, on the block's "
               f"{maps.grid[0]}×{maps.grid[1]} grid; each panel has its own colour scale.")
    widgets.downloads(f"c2f_{maps.name}_{who.replace(' ', '')}", overlay.encode_png(overlay.tile(tiles, cols=3)))


def groups_tab(maps: ModulationMaps, crop: object) -> None:
    kind = st.radio("Map", list(conv2former_view.KINDS), key="c2f_groups_kind", horizontal=True,
                    format_func=lambda k: conv2former_view.KINDS[k].split(" (")[0])
    stack = maps.maps(kind)
    titles = [group_label(maps, g) for g in range(stack.shape[0])]
    fig = figures.heads_grid(crop, stack, titles=titles, cols=4)
    fig.update_layout(coloraxis={"colorbar": {"title": {"text": "mean |.|"}}})
    st.plotly_chart(fig, key="c2f_groups_fig")
    widgets.downloads(f"c2f_groups_{maps.name}_{kind}", fig=fig)


def display_map(values: torch.Tensor) -> torch.Tensor:
    if max(values.shape) <= DISPLAY_SIDE:
        return values
    size = (min(values.shape[0], DISPLAY_SIDE), min(values.shape[1], DISPLAY_SIDE))
    return F.adaptive_avg_pool2d(values[None, None].double(), size)[0, 0]


def footprint_tab(result: Conv2FormerAnalysis, crop: object, vit: conv2former_view.Footprint, label: str) -> None:
    stage = st.radio("End of stage", result.stages, key="c2f_stage", horizontal=True, format_func=lambda s: f"{s + 1}")
    prints = [*result.stage_footprints(stage), vit]
    shown = [display_map(f.weights) for f in prints]
    # Log colours (display only): gradient footprints are peaked, so a linear scale shows a few pixels.
    stack = torch.stack([torch.log1p(99 * m / m.max().clamp_min(1e-12)) / math.log(100) for m in shown])
    fig = figures.heads_grid(crop, stack, titles=[f.label for f in prints], cols=4)
    fig.update_layout(coloraxis={"cmin": 0.0, "cmax": 1.0, "colorbar": {"title": {"text": "log, / max"}}})
    st.plotly_chart(fig, key="c2f_footprint_fig")
    st.markdown(conv2former_view.comparison_sentence(result, stage, vit, label))
    rows = [{"footprint": f.label, "block": f.block,
             **{f"side holding {t:g}": f.side[t] for t in conv2former_view.THRESHOLDS},
             "area ratio 0.5": f.area_ratio[0.5], "mean distance (px)": f.mean_distance} for f in prints]
    st.dataframe(rows, hide_index=True)
    st.caption("Gradient receptive field of the centre output of the stage's last block on this image: "
               "ReLU(∂ Σ_c ReLU(out_c) / ∂ input), summed over RGB (colours: log scale, each map divided by "
               "its maximum; the numbers use the linear map). Random-init copies use layer scale 1 "
               "(with the official 1e-6 an untrained block is the identity); the ViT column is its "
               "last-layer attention of the centre patch spread over that patch's pixels.")
    widgets.downloads(f"c2f_footprint_stage{stage + 1}", fig=fig, csv=figures.table_csv(rows))


def table_tab(result: Conv2FormerAnalysis) -> None:
    rows = result.block_table()
    st.dataframe(rows, hide_index=True)
    st.caption("Spatial CV: std / mean over positions of the all-channel map (0 = flat). Kernel side: the "
               "centred square of the trained depthwise kernel holding that share of mean |w|.")
    widgets.downloads("c2f_blocks", csv=figures.table_csv(rows))


# --- the page ------------------------------------------------------------------------------------

st.title("Conv2Former modulation")
st.markdown(CLAIM)
image = sidebar.require_image()
choice = models.model_picker({**models.bundled_options((BUNDLED,)), **OFFICIAL}, key="c2f_model", default=BUNDLED)
vit_choice = models.model_picker({**models.bundled_options(VIT_BUNDLED), **HUB_MODELS}, key="c2f_vit",
                                 default="vit_cifar", title="ViT to compare with")
forward, label, loaded = run_conv2former(choice, image)
result: Conv2FormerAnalysis = forward.result
vit_forward, vit_label = models.analyse_reference_vit(vit_choice, image)
vit_print = conv2former_view.vit_footprint(vit_forward.result, result.input_size, name=vit_label)

maps, group = pick_block(result)
maps_panel(maps, group, forward.crop)
widgets.run_open_tab({
    "Kernel footprint (k = 7 vs 11)": lambda: footprint_tab(result, forward.crop, vit_print, label),
    "All channel groups": lambda: groups_tab(maps, forward.crop),
    "Numbers per block": lambda: table_tab(result),
}, key="c2f_tab")

"""FCViT global context: one similarity map per head, shared by every query, next to ViT attention.

Story: the model runs once on the sidebar image (cached per image, model and weights); block, module,
map and head pickers only look maps up. The ViT comparison reuses the ViT attention page's cache.
"""

from __future__ import annotations

import streamlit as st

from ui import models, sidebar, widgets
from vizlib import attention, fcvit_view, figures, overlay, weights
from vizlib.fcvit_view import FCViTAnalysis
from vizlib.weights import HUB_MODELS, LoadedModel

BUNDLED = "fcvit_cifar"
OFFICIAL = {name: "official weights: upload the file below" for name in
            ("fcvit_tiny", "fcvit_b12", "fcvit_b24", "fcvit_b48")}
VIT_BUNDLED = ("vit_cifar", "deit_cifar_distilled")
MEAN_OF_HEADS = "mean of heads"
CLAIM = (
    "**Paper.** FCViT (*A Close Look at Spatial Modeling: From Attention to Convolution*) observes that deep "
    "ViT attention maps are nearly the same for every query, so one **global context per image** should "
    "suffice: per head, a similarity map S of every position with the mean token, standardised (S′) and "
    "rescaled (S″ = α·S′ + β), shared by all positions, followed by large-kernel depthwise convolutions."
)
HOW = (
    "How the two are compared: S″ is a score, not a distribution, so each head's map goes through a softmax "
    "over positions; every query of FCViT gets that same row, so its query-independence is 1 by "
    "construction, and entropy, top-5% mass and Gini are computed exactly as for the ViT's rows."
)


def run_fcvit(choice: models.ModelChoice, image: sidebar.ImageChoice) -> tuple[models.Forward, str, LoadedModel]:
    """Load (official architectures need an uploaded file) and analyse once; returns (forward, label, model)."""
    fallback = models.ModelChoice(BUNDLED, "bundled")
    if choice.weights != "file" and weights.find_checkpoint(choice.name) is None:
        st.info(f"{choice.name} has no bundled weights: upload its official checkpoint under "
                f"“Use your own checkpoint” in the sidebar. Showing {BUNDLED} meanwhile.")
        choice = fallback
    forward, used, loaded = models.analyse_or_stop("fcvit", image, choice, fallback,
                                                   fcvit_view.analyse_fcvit)
    st.caption(f"Weights: {loaded.weights}. {used.name} predicts: "
               f"{figures.prediction_text(forward.result.logits, loaded.class_names)}.")
    return forward, used.name if used.weights == "bundled" else used.label, loaded


def pick_maps(result: FCViTAnalysis) -> tuple[fcvit_view.GlobalContextMaps, str, int | None]:
    """Block, module, map kind and head pickers; returns (module maps, kind, head or None for the mean)."""
    blocks = result.blocks
    if st.session_state.get("fcvit_block") not in blocks:
        st.session_state["fcvit_block"] = blocks[-1]
    heads = [MEAN_OF_HEADS] + [f"head {i + 1}" for i in range(result.num_heads)]
    if st.session_state.get("fcvit_head") not in heads:
        st.session_state["fcvit_head"] = MEAN_OF_HEADS
    block_col, module_col, kind_col, head_col = st.columns([3, 2, 4, 2])
    block = block_col.selectbox("Block", blocks, key="fcvit_block", format_func=fcvit_view.block_label)
    which = module_col.radio("Module", ["gc1", "gc2"], key="fcvit_module", horizontal=True)
    kind = kind_col.selectbox("Map", list(fcvit_view.MAP_KINDS), key="fcvit_kind",
                              format_func=fcvit_view.MAP_KINDS.get)
    head_label = head_col.selectbox("Head", heads, key="fcvit_head")
    head = None if head_label == MEAN_OF_HEADS else heads.index(head_label) - 1
    return result.module(block, which), kind, head


def map_panel(maps: fcvit_view.GlobalContextMaps, kind: str, head: int | None, crop: object) -> None:
    stack = maps.maps(kind)
    values = stack.mean(0) if head is None else stack[head]
    who = MEAN_OF_HEADS if head is None else f"head {head + 1}"
    title = f"{fcvit_view.block_label(maps.block)} · {maps.module} · {who}"
    left, right = st.columns(2)
    signed = kind != "distribution"
    fig = figures.heatmap_over_image(crop, values, title=title, height=380, colorbar_title=kind.replace("_", " "),
                                     zmin=float(values.min()), zmax=float(values.max()))
    left.plotly_chart(fig, key="fcvit_map_fig")
    with left:
        png = overlay.render_overlay(crop, values, maps.grid, show_grid=False)
        widgets.downloads(f"fcvit_{maps.name}_{kind}_{who.replace(' ', '')}", overlay.encode_png(png), fig)
    context = figures.heatmap_over_image(crop, maps.context, title="context: ‖S″·u‖ over channels", height=380,
                                         zmin=0.0, colorbar_title="norm")
    right.plotly_chart(context, key="fcvit_context_fig")
    right.caption(f"One map for every query: {maps.grid[0]}×{maps.grid[1]} positions. "
                  + ("Signed map (min–max colours). " if signed else "Each head's softmax sums to 1. ")
                  + "Right: the norm over channels of what the module adds to each position.")


def heads_tab(result: FCViTAnalysis, maps: fcvit_view.GlobalContextMaps, kind: str, crop: object) -> None:
    stack = maps.maps(kind)
    fig = figures.heads_grid(crop, stack, titles=[f"head {i + 1}" for i in range(maps.num_heads)], cols=4)
    # heads_grid assumes attention (>= 0); S, S' and S'' are signed: one shared scale over their range.
    fig.update_layout(coloraxis={"cmin": float(stack.min()), "cmax": float(stack.max()),
                                 "colorbar": {"title": {"text": kind.replace("_", " ")}}})
    st.plotly_chart(fig, key="fcvit_heads_fig")
    rows = result.head_table(maps.block, maps.module)
    st.dataframe(rows, hide_index=True)
    st.caption(f"Head independence (mean cosine between heads' softmax maps): {maps.head_independence:.2f}. "
               "Spatial std is of S″; entropy, top-5% mass and Gini are of softmax(S″).")
    widgets.downloads(f"fcvit_heads_{maps.name}_{kind}", fig=fig, csv=figures.table_csv(rows))


def depth_tab(result: FCViTAnalysis) -> None:
    fig = fcvit_view.depth_figure(result)
    st.plotly_chart(fig, key="fcvit_depth_fig")
    st.markdown(fcvit_view.depth_sentence(result))
    rows = [{"module": label, **{k: v[i] for k, v in result.depth.items()}}
            for i, label in enumerate(result.module_labels())]
    widgets.downloads("fcvit_depth", fig=fig, csv=figures.table_csv(rows))


def vit_section(result: FCViTAnalysis, crop: object, vit: attention.AttentionAnalysis, vit_crop: object,
                labels: tuple[str, str]) -> None:
    st.subheader("Next to ViT attention")
    comparison = fcvit_view.compare_with_vit(result, vit)
    st.markdown(fcvit_view.comparison_sentence(comparison, *labels))
    last = result.modules[-1]
    left, right = st.columns([2, 3])
    fig = figures.heatmap_over_image(crop, last.distribution.mean(0), zmin=0.0, height=360,
                                     title=f"{labels[0]}: last global context (every query)")
    left.plotly_chart(fig, key="fcvit_shared_fig")
    h, w = vit.grid
    queries = overlay.spread_queries(vit.grid, (h // 2, w // 2), 4)
    maps = [[vit.query_map(len(vit.layers) - 1, None, r * w + c).numpy() for r, c in queries]]
    grid_fig = figures.query_grid(vit_crop, maps, queries=queries, row_titles=[f"layer {len(vit.layers)}"],
                                  title=f"{labels[1]}: last layer, four queries (mean of heads)")
    right.plotly_chart(grid_fig, key="fcvit_vit_fig")
    rows = [{"model": label, **{figures.METRIC_LABELS[m]: comparison[side][m] for m in fcvit_view.COMPARED}}
            for label, side in zip(labels, ("fcvit", "vit"), strict=True)]
    st.dataframe(rows, hide_index=True)
    st.caption(HOW)
    widgets.downloads("fcvit_vs_vit", fig=grid_fig, csv=figures.table_csv(rows))


# --- the page ------------------------------------------------------------------------------------

st.title("FCViT global context")
st.markdown(CLAIM)
image = sidebar.require_image()
choice = models.model_picker({**models.bundled_options((BUNDLED,)), **OFFICIAL}, key="fcvit_model",
                             default=BUNDLED)
vit_choice = models.model_picker({**models.bundled_options(VIT_BUNDLED), **HUB_MODELS}, key="fcvit_vit",
                                 default="vit_cifar", title="ViT to compare with")
forward, label, loaded = run_fcvit(choice, image)
result: FCViTAnalysis = forward.result
vit_forward, vit_label = models.analyse_reference_vit(vit_choice, image)
accuracy = None if loaded.checkpoint is None else loaded.checkpoint.test_accuracy
if loaded.source == "bundled" and (accuracy is None or accuracy < 50):
    st.caption("This bundled FCViT was trained only briefly: read its maps as a demonstration of the "
               "mechanism, not of the paper's trained model.")

maps, kind, head = pick_maps(result)
map_panel(maps, kind, head, forward.crop)
vit_section(result, forward.crop, vit_forward.result, vit_forward.crop, (label, vit_label))
widgets.run_open_tab({
    "All heads": lambda: heads_tab(result, maps, kind, forward.crop),
    "Change with depth": lambda: depth_tab(result),
}, key="fcvit_tab")

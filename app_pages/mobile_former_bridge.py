"""Mobile-Former bridge: how a few global tokens read from and write into the feature map.

Story: pick a model (sidebar), run it once on the sidebar image, then pick blocks, heads and tokens
freely: every view below is a lookup in the cached analysis, never a new forward pass.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from ui import models, sidebar, widgets
from vizlib import figures, overlay
from vizlib import mobile_former_view as mfv
from vizlib.mobile_former_view import MobileFormerAnalysis
from vizlib.weights import LoadedModel

BUNDLED = "mobile_former_cifar"
# Official ImageNet variants: weights are Google Drive files (no hub), so they come as an upload.
OFFICIAL = ("mobile_former_508m", "mobile_former_294m", "mobile_former_214m", "mobile_former_151m",
            "mobile_former_96m", "mobile_former_52m", "mobile_former_26m")
MEAN_OF_HEADS = "mean of heads"
CLAIM = (
    "**Paper.** Mobile-Former (*Bridging MobileNet and Transformer*, CVPR 2022) runs a MobileNet and a "
    "handful of **global tokens** in parallel: in every block the tokens read the feature map "
    "(**Mobile→Former**, each token a softmax over pixels) and write back into it (**Mobile←Former**, "
    "each pixel a softmax over tokens), a light two-way cross-attention instead of attention between pixels."
)


def analyse(choice: models.ModelChoice, image: sidebar.ImageChoice) -> tuple[models.Forward, models.ModelChoice,
                                                                           LoadedModel]:
    """Load (official variants need an uploaded file; otherwise the bundled model) and run once."""
    fallback = models.ModelChoice(BUNDLED, "bundled")
    if choice.weights not in ("bundled", "file"):
        st.info(f"{choice.name} has no bundled weights: upload the official checkpoint under "
                "*Use your own checkpoint* in the sidebar. Showing the bundled model meanwhile.")
        choice = fallback
    forward, used, loaded = models.analyse_or_stop(
        "mobile-former", image, choice, fallback, mfv.analyse_mobile_former
    )
    return forward, used, loaded


def pickers(result: MobileFormerAnalysis) -> tuple[int, int | None, int]:
    """Block, head and token pickers (0-based block, head None = mean, token)."""
    depth, tokens = len(result.blocks), result.num_tokens
    widgets.clamp_state("mf_block", 1, depth, 1)
    widgets.clamp_state("mf_token", 0, tokens - 1, 0)
    head_options = [MEAN_OF_HEADS] + [f"head {i + 1}" for i in range(result.num_heads)]
    if st.session_state.get("mf_head") not in head_options:
        st.session_state["mf_head"] = MEAN_OF_HEADS
    first, second, third = st.columns([3, 2, 2])
    block = int(first.slider("Block", 1, depth, key="mf_block")) if depth > 1 else 1
    head_label = second.selectbox("Head", head_options, key="mf_head")
    token = int(third.selectbox("Token", list(range(tokens)), key="mf_token", format_func=lambda t: f"token {t}"))
    head = None if head_label == MEAN_OF_HEADS else head_options.index(head_label) - 1
    return block - 1, head, token


def bridges_row(result: MobileFormerAnalysis, crop: np.ndarray, block: int, head: int | None, token: int) -> None:
    """The selected token's Mobile->Former map beside the Mobile<-Former argmax token map."""
    info = result.blocks[block]
    left, right = st.columns(2)
    maps = result.token_maps(block, head)
    entropy = float(mfv.map_entropy(maps[token]))
    with left:
        picture = overlay.render_overlay(crop, maps[token], info.l2g_grid, vmin=0.0)
        st.image(picture, caption=f"Mobile→Former, {info.name}: where token {token} reads from "
                 f"({info.l2g_grid[0]}×{info.l2g_grid[1]} block input; entropy {entropy:.2f}, 1 = everywhere).")
        widgets.downloads(f"mf_m2f_{info.name}_t{token}", overlay.encode_png(picture))
    shares = result.pixel_shares(block, head)
    with right:
        picture = mfv.assignment_image(crop, result.assignment(block, head))
        listing = ", ".join(f"token {t} {100 * float(s):.0f}%" for t, s in enumerate(shares) if s > 0)
        st.image(picture, caption=f"Mobile←Former, {info.name}: each pixel tinted by the token it takes most "
                 f"from ({info.g2l_grid[0]}×{info.g2l_grid[1]} block output). Pixels per token: {listing}.")
        widgets.downloads(f"mf_f2m_{info.name}", overlay.encode_png(picture))


def tokens_tab(result: MobileFormerAnalysis, crop: np.ndarray, block: int, head: int | None) -> None:
    maps = result.token_maps(block, head)
    titles = [f"token {t}" for t in range(result.num_tokens)]
    fig = figures.heads_grid(crop, maps, titles=titles)
    st.plotly_chart(fig, key="mf_tokens_fig")
    st.caption("Mobile→Former: every token's softmax over the pixels of this block's input, one colour scale. "
               f"Mean cosine between the tokens' maps: {float(result.map_overlap(head)[block]):.2f} "
               "(1 = all tokens read the same place).")
    widgets.downloads(f"mf_tokens_b{block + 1}", fig=fig)


def assignment_tab(result: MobileFormerAnalysis, crop: np.ndarray, block: int, head: int | None) -> None:
    soft = result.soft_assignment(block, head)
    fig = figures.heads_grid(crop, soft, titles=[f"token {t}" for t in range(result.num_tokens)])
    st.plotly_chart(fig, key="mf_soft_fig")
    st.caption("Mobile←Former: at every pixel the softmax over tokens, one map per token; the maps sum to 1 "
               "at each pixel. The argmax of these maps is the tinted picture above.")
    st.plotly_chart(mfv.assignment_figure(result.assignment(block, head), result.num_tokens,
                                          title="strongest token per pixel"), key="mf_argmax_fig")
    widgets.downloads(f"mf_assignment_b{block + 1}", fig=fig)


def blocks_tab(result: MobileFormerAnalysis, head: int | None, token: int) -> None:
    left, right = st.columns(2)
    left.plotly_chart(mfv.trajectory_figure(result, head, highlight=token), key="mf_traj_fig")
    left.caption("Centre of mass of each token's Mobile→Former map, block by block (numbers are blocks).")
    entropy = result.entropy(head).numpy()
    right.plotly_chart(mfv.per_block_figure(entropy, "normalised entropy", result.block_names, highlight=token),
                       key="mf_entropy_fig")
    right.caption("Normalised entropy of each token's Mobile→Former map: 1 = reads the whole map evenly.")
    rows = [{"block": b + 1, "name": result.block_names[b], "token": t,
             "centroid_row": float(c[0]), "centroid_col": float(c[1]), "entropy": float(entropy[b, t])}
            for b, per_token in enumerate(result.centroids(head)) for t, c in enumerate(per_token)]
    widgets.downloads("mf_token_regions", csv=figures.table_csv(rows))


def similarity_tab(result: MobileFormerAnalysis, block: int, token: int) -> None:
    left, right = st.columns(2)
    labels = [f"token {t}" for t in range(result.num_tokens)]
    left.plotly_chart(mfv.matrix_figure(result.token_similarity[block], labels,
                                        title=f"tokens after {result.block_names[block]}"), key="mf_sim_fig")
    depths = ["initial"] + [f"block {b + 1}" for b in range(len(result.blocks))]
    right.plotly_chart(mfv.matrix_figure(result.cross_block_similarity(token), depths,
                                         title=f"token {token} across blocks"), key="mf_cross_fig")
    st.plotly_chart(mfv.per_block_figure(result.token_drift.numpy(), "cosine to the previous block",
                                         result.block_names, highlight=token), key="mf_drift_fig")
    st.caption("Left: cosine between the tokens after this block (low = the tokens carry different "
               "information). Right: one token against itself at every depth. Bottom: how much each block "
               "changes each token (1 = unchanged).")


def numbers_sentence(result: MobileFormerAnalysis, block: int, head: int | None) -> str:
    """What the numbers on screen say about the paper's claim, for this block."""
    entropy = result.entropy(head)[block]
    shares = result.pixel_shares(block, head)
    top = int(shares.argmax())
    sims = [mfv.mean_offdiagonal(m) for m in result.token_similarity]
    # Thresholds on the mean cosine between tokens after the last block, for the one-line reading.
    if sims[-1] < 0.5:
        verdict = "the few tokens stay distinct summaries rather than collapsing into one"
    elif sims[-1] < 0.8:
        verdict = "the tokens grow partly alike but still differ"
    else:
        verdict = "by the last block the tokens carry largely the same information"
    return (
        f"**This model, this image.** In block {block + 1} ({result.blocks[block].name}) the {result.num_tokens} "
        f"tokens read with normalised entropy {float(entropy.min()):.2f}–{float(entropy.max()):.2f} (1 = the "
        f"whole map evenly), their reading maps overlap with mean cosine "
        f"{float(result.map_overlap(head)[block]):.2f}, and on the way back token {top} is the strongest writer "
        f"for {100 * float(shares[top]):.0f}% of the pixels. The mean cosine between tokens goes from "
        f"{sims[0]:.2f} after block 1 to {sims[-1]:.2f} after block {len(sims)}: {verdict}."
    )


# --- the page ------------------------------------------------------------------------------------

st.title("Mobile-Former bridge")
st.markdown(CLAIM)
image = sidebar.require_image()
options = {**models.bundled_options((BUNDLED,)),
           **{name: "ImageNet, official weights from a file" for name in OFFICIAL}}
choice = models.model_picker(options, key="mf_model", default=BUNDLED)
forward, used, loaded = analyse(choice, image)
result: MobileFormerAnalysis = forward.result
accuracy = loaded.checkpoint.test_accuracy if loaded.checkpoint is not None else None
st.caption(f"Weights: {loaded.weights}." + ("" if accuracy is None or accuracy >= 50 else
           " These weights are barely trained: read the maps as a demonstration of the measurements."))
st.caption(f"{used.name} predicts: {figures.prediction_text(result.logits, loaded.class_names)}")

block, head, token = pickers(result)
st.markdown(numbers_sentence(result, block, head))
bridges_row(result, forward.crop, block, head, token)
widgets.run_open_tab({
    "All tokens (Mobile→Former)": lambda: tokens_tab(result, forward.crop, block, head),
    "Pixel → token (Mobile←Former)": lambda: assignment_tab(result, forward.crop, block, head),
    "Token regions through the blocks": lambda: blocks_tab(result, head, token),
    "Token similarity": lambda: similarity_tab(result, block, token),
}, key="mf_tab")

"""Receptive field & CE depth: does a deeper convolutional embedding (CE) widen CETNet's effective receptive
field, as the paper argues?

Story: the same N images (the sidebar image, then bundled samples) go through CETNet with a 1-, 3-, 5- and
7-layer CE, trained and at initialisation; each model's ERF (RepLKNet recipe, one backward per batch) is drawn
log-scaled and summarised as area ratios. Results are cached per (images, model, weights, N, size), so coming
back costs nothing; changing an input mid-run stops the loop at its next progress update.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import streamlit as st
from PIL import Image

from ui import models, sidebar, widgets
from vizlib import checkpoints, erf, figures, images, weights
from vizlib import erf_figures as ef
from vizlib.erf import ErfAccumulation, ErfModel
from vizlib.weights import ModelCache, WeightsError, module_bytes

CE_DEPTHS = (1, 3, 5, 7)
CE_MODE, OTHER_MODE = "CETNet CE depth 1/3/5/7", "Other registered models"
TRAINED, INIT = "trained", "at initialisation"
SIZES = (32, 48, 64, 96, 128, 224)
DEFAULT_SIZE = 64
DEFAULT_N = 4
OTHER_DEFAULT = ("vit_cifar", "conv2former_cifar", "mobile_former_cifar")
CLAIM = (
    "**Paper.** CETNet (*Convolutional Embedding Makes Hierarchical Vision Transformer Stronger*, ECCV 2022) "
    "replaces patch merging with a stack of MBConvs and argues that a deeper CE gives a larger **effective "
    "receptive field**: going from 1 to 5 CE layers adds **+0.8% ImageNet top-1** (81.8% → 82.6%) at equal "
    "parameters and FLOPs, and 7 layers add almost nothing more."
)


@dataclass(frozen=True)
class Spec:
    """One ERF to compute: a model (checkpoint id or registered name) with trained or initial weights."""

    name: str
    weights: str  # "bundled" or "init"
    column: str  # its column in the figure (CE depth or model name)
    row: str  # TRAINED or INIT


@st.cache_resource(show_spinner=False)
def sample_pool() -> list[tuple[Image.Image, str]]:
    """Bundled samples (CIFAR ones first: the models are CIFAR models) with their pixel digests, once."""
    paths = sorted(images.list_samples(), key=lambda p: (not p.stem.startswith("cifar_"), p.name))
    pictures = [images.load_image(p) for p in paths]
    return [(picture, sidebar.image_digest(picture)) for picture in pictures]


def image_set(choice: sidebar.ImageChoice) -> list[tuple[Image.Image, str]]:
    """The sidebar image first, then the samples that are not the same picture."""
    return [(choice.image, choice.digest)] + [(p, d) for p, d in sample_pool() if d != choice.digest]


@st.cache_resource(show_spinner=False)
def erf_model_cache() -> ModelCache:
    """One per process, bounded by parameter bytes like the app's model cache."""
    return ModelCache(models.MODEL_CACHE_BYTES, sizeof=lambda m: module_bytes(m.model))


def load(spec: Spec, size: int) -> ErfModel:
    key = ("erf-model", spec.name, spec.weights, size)
    return erf_model_cache().get_or_load(key, lambda: erf.load_erf_model(spec.name, spec.weights, size=size))


def compute(specs: list[Spec], pictures: list[Image.Image], digest: str, size: int
            ) -> tuple[dict[Spec, ErfAccumulation], dict[Spec, str]]:
    """Every spec's ERF, from the cache or computed under one progress bar; failures become sentences."""
    cache = models.analysis_cache()
    keys = {spec: ("erf", digest, spec.name, spec.weights, len(pictures), size) for spec in specs}
    todo = [spec for spec in specs if keys[spec] not in cache]
    bar = st.progress(0.0, text="Computing receptive fields…") if todo else None
    results: dict[Spec, ErfAccumulation] = {}
    failures: dict[Spec, str] = {}
    for spec in specs:
        done = todo.index(spec) if spec in todo else 0

        def report(fraction: float, spec: Spec = spec, done: int = done) -> None:
            # Each update is a Streamlit yield point: a rerun (changed input) stops the loop right here.
            if bar is not None:
                bar.progress((done + fraction) / len(todo),
                             text=f"{spec.column} {spec.row}: {round(fraction * len(pictures))}/{len(pictures)} images")

        def run(spec: Spec = spec, report: erf.Progress = report) -> ErfAccumulation:
            report(0.0)
            loaded = load(spec, size)
            x = erf.prepare_images(pictures, loaded.pretrained_cfg, size)
            return erf.erf_accumulate(loaded.model, x, progress=report)

        try:
            results[spec] = cache.get_or_load(keys[spec], run)
        except (WeightsError, ValueError, TypeError, RuntimeError) as exc:
            failures[spec] = f"{spec.name} ({spec.row}) at {size}×{size}: {exc}"
    if bar is not None:
        bar.empty()
    return results, failures


def ratio_table(results: dict[Spec, ErfAccumulation], rows: list[str], columns: list[str]
                ) -> dict[str, dict[str, dict[float, float]]]:
    """row (weights) -> column -> {threshold: area ratio}, in display order."""
    by_cell = {(s.row, s.column): erf.area_ratios(r.map) for s, r in results.items()}
    return {row: {col: by_cell[(row, col)] for col in columns if (row, col) in by_cell} for row in rows}


def training_summary() -> str:
    """Epochs and test accuracy of the bundled CETNets, read from their sidecars."""
    parts = []
    for depth in CE_DEPTHS:
        info = weights.find_checkpoint(f"cetnet_cifar_ce{depth}")
        if info is not None and info.test_accuracy is not None:
            parts.append(f"CE {depth}: {info.epochs} epochs, {info.test_accuracy:.0f}%")
    return "; ".join(parts) + " test accuracy" if parts else "no test accuracy recorded"


def ratio_step(size: int) -> str:
    """The two area ratios either side of 0.5 at this input size (odd sides only)."""
    side = int(size / 2 ** 0.5) | 1
    while side > 3 and side * side > size * size / 2:
        side -= 2
    return f"{side * side / size ** 2:.2f} → {(side + 2) ** 2 / size ** 2:.2f}"


def feature_sizes(results: dict[Spec, ErfAccumulation]) -> str:
    """The last feature map's size, once when every model shares it."""
    by_column = {s.column: f"{r.feature_hw[0]}×{r.feature_hw[1]}" for s, r in results.items()}
    if len(set(by_column.values())) == 1:
        return next(iter(by_column.values()))
    return ", ".join(f"{c}: {hw}" for c, hw in by_column.items())


# --- the page ------------------------------------------------------------------------------------

st.title("Receptive field & CE depth")
st.markdown(CLAIM)
image = sidebar.require_image()
pool = image_set(image)

mode = st.radio("Compare", (CE_MODE, OTHER_MODE), key="erf_mode", horizontal=True)
left, middle, right = st.columns(3)
widgets.clamp_state("erf_n", 1, len(pool), DEFAULT_N)
n = int(left.slider("Images (N)", 1, len(pool), key="erf_n",
                    help="The sidebar image first, then bundled samples (CIFAR-10 ones first)."))
if st.session_state.get("erf_size") not in SIZES:
    # 64, not the training size 32: at 32 px CETNet's last map is 2x2 and every ERF reaches the border,
    # so the depths cannot separate (measured: equal area ratios at 32, a clear trend at 64).
    st.session_state["erf_size"] = DEFAULT_SIZE
size = int(middle.select_slider("Input size (px)", SIZES, key="erf_size",
                                help="The bundled models were trained at 32 px, where the last feature map is "
                                     "only 2x2 and every ERF reaches the border; 64 px separates the depths."))
with_init = right.toggle("Also at initialisation", value=True, key="erf_init")
weight_rows = [TRAINED, INIT] if with_init else [TRAINED]

if mode == CE_MODE:
    columns = [f"CE {d}" for d in CE_DEPTHS]
    specs = [Spec(f"cetnet_cifar_ce{d}", w, f"CE {d}", row) for row, w in ((TRAINED, "bundled"), (INIT, "init"))
             if row in weight_rows for d in CE_DEPTHS]
else:
    others = [i.checkpoint_id for i in checkpoints.list_checkpoints() if i.model != "cetnet_cifar"]
    chosen = st.multiselect("Models", others, default=[m for m in OTHER_DEFAULT if m in others], key="erf_models")
    if not chosen:
        st.info("Pick at least one model.")
        st.stop()
    columns = list(chosen)
    specs = [Spec(name, w, name, row) for row, w in ((TRAINED, "bundled"), (INIT, "init"))
             if row in weight_rows for name in chosen]

pictures = [picture for picture, _ in pool[:n]]
digest = hashlib.sha256("".join(d for _, d in pool[:n]).encode()).hexdigest()
results, failures = compute(specs, pictures, digest, size)
for message in failures.values():
    st.warning(message)
if not results:
    st.stop()

ratios = ratio_table(results, weight_rows, columns)
sentence = ef.depth_sentence(ratios, 0.5) if mode == CE_MODE else ef.models_sentence(ratios, 0.5)
st.markdown(f"**These images, these models.** {sentence}")
if mode == CE_MODE:
    st.caption(f"The bundled CETNets are short CIFAR-10 runs ({training_summary()}), so the trained row shows "
               "what a little training does to the ERF, not the paper's ImageNet models.")

maps = {(s.row, s.column): r.map for s, r in results.items()}
fig = ef.erf_figure([[maps.get((row, col)) for col in columns] for row in weight_rows],
                    row_titles=weight_rows, col_titles=columns)
st.plotly_chart(fig, key="erf_maps_fig")
st.caption(f"Mean ERF over {n} image{'s' if n > 1 else ''} at {size}×{size} px, drawn as log10(ERF + 1) / max "
           "(RdYlGn centred at 0: yellow little, green most). Objective: all channels at the centre point (row "
           f"H//2, column W//2) of the last feature map ({feature_sizes(results)}); dotted: the centred square "
           "holding half of the log-scaled map (t = 0.5).")

ratio_fig = ef.area_ratio_figure(ratios, x_title="CE depth" if mode == CE_MODE else "model")
st.plotly_chart(ratio_fig, key="erf_ratio_fig")
rows = ef.ratio_rows(ratios, "ce" if mode == CE_MODE else "model")
st.dataframe(rows, hide_index=True)
st.caption("Area ratio r = side² / (H·W) of the smallest centred square (side 2i+1) holding more than a fraction "
           f"t of the log-scaled map; 1 means no smaller square does. The side grows 2 px at a time, so at {size} px "
           f"r moves in steps ({ratio_step(size)} around r = 0.5).")
if all(values.get(0.99) == 1.0 for by_col in ratios.values() for values in by_col.values()):
    st.info(f"At {size} px every ERF here reaches the border (r = 1 at t = 0.99): the last feature map is "
            f"{feature_sizes(results)}, so its centre point already sees the whole input. A larger input size "
            "separates the models.")
widgets.downloads(f"erf_{'ce' if mode == CE_MODE else 'models'}_n{n}_{size}px", fig=ratio_fig,
                  csv=figures.table_csv(rows))

"""Home: what HybridLens shows and where to start."""

from __future__ import annotations

import streamlit as st

from ui import navigation, sidebar

st.title("HybridLens")
st.markdown(
    "HybridLens shows **how vision transformers and hybrid CNN/ViT models look at an image**. Each page "
    "takes one observation from a paper, runs a model once on your image, and lets you check the claim "
    "yourself: click a patch, switch layers and heads, compare two models, and download the figures "
    "(PNG, HTML) and the numbers (CSV)."
)
st.markdown(
    "1. Pick an image in the sidebar: a bundled sample, your own upload, or a camera snapshot. "
    "It stays selected on every page.\n"
    "2. Open a page below. The bundled CIFAR-10 models work offline; pretrained ImageNet models load "
    "from the Hugging Face Hub when it is reachable."
)
for spec in navigation.PAGES:
    if not spec.default:
        st.page_link(spec.path, label=spec.title, icon=spec.icon)
if (choice := sidebar.current_image()) is not None:
    st.caption(f"Current image: {choice.label}.")

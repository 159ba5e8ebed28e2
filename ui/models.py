"""Model picking, memory-bounded model caching and once-per-image analysis caching for every page.

Two process-wide caches (``st.cache_resource`` holding :class:`vizlib.weights.ModelCache` objects):

* models, keyed by (name, weights source, checkpoint file), bounded by parameter bytes;
* analyses, keyed by (what, image digest, model key), bounded by the bytes of the tensors they hold.

So a new query click, layer or head is a lookup: the forward pass runs once per image and model.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import streamlit as st
import torch
from torch import nn

from ui.sidebar import ImageChoice
from vizlib import attention, images, weights
from vizlib.weights import LoadedModel, ModelCache, WeightsError

T = TypeVar("T")

MODEL_CACHE_BYTES = int(os.environ.get("HYBRIDLENS_MODEL_CACHE_MB", "2048")) * 2**20
ANALYSIS_CACHE_BYTES = int(os.environ.get("HYBRIDLENS_ANALYSIS_CACHE_MB", "512")) * 2**20
CHECKPOINT_TYPES = tuple(s.lstrip(".") for s in (*weights.SAFETENSORS_SUFFIXES, *weights.TORCH_SUFFIXES))
UPLOAD_DIR = Path(tempfile.gettempdir()) / "hybridlens_checkpoints"
FAILED_KEY = "hl_failed_models"  # per session: model key -> error sentence (no 2 s hub probe per click)


@dataclass(frozen=True)
class ModelChoice:
    """What the user picked: an architecture (or checkpoint id) and where its weights come from."""

    name: str
    weights: str  # "bundled", "hub", "file" or "url"
    path: str | None = None  # the uploaded checkpoint on disk (weights == "file") or its URL ("url")
    file_name: str = ""

    @property
    def key(self) -> tuple[str, str, str | None]:
        return self.name, self.weights, self.path

    @property
    def label(self) -> str:
        if self.weights in ("file", "url"):
            return f"{self.name} ({self.file_name})"
        return f"{self.name} ({self.weights})"

    def load(self) -> LoadedModel:
        return weights.load_model(self.name, self.path if self.weights in ("file", "url") else self.weights)


def bundled_options(names: tuple[str, ...]) -> dict[str, str]:
    """name -> description for the bundled checkpoints among ``names`` (those installed)."""
    options = {}
    for name in names:
        info = weights.find_checkpoint(name)
        if info is not None:
            accuracy = "" if info.test_accuracy is None else f", {info.test_accuracy:.0f}% test accuracy"
            options[name] = f"bundled CIFAR-10{accuracy}"
    return options


def default_source(name: str) -> str:
    return "bundled" if weights.find_checkpoint(name) is not None else "hub"


def _save_upload(uploaded: Any) -> tuple[str, str]:
    """Write an uploaded checkpoint to a content-addressed temp folder under its own (sanitised) name,
    so loaders get a path with the right suffix and messages name the user's file."""
    data = uploaded.getvalue()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(uploaded.name).name).lstrip(".") or "checkpoint"
    folder = UPLOAD_DIR / hashlib.sha256(data).hexdigest()[:24]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        tmp = folder / f".{name}.part"
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: another session never reads half a file
    return str(path), name


def model_picker(options: Mapping[str, str], *, key: str, default: str, title: str = "Model") -> ModelChoice:
    """Sidebar selectbox over ``options`` (name -> description) plus an optional checkpoint upload."""
    names = list(options)
    if st.session_state.get(key) not in names:
        st.session_state[key] = default if default in names else names[0]
    with st.sidebar:
        st.subheader(title)
        name = st.selectbox(title, names, key=key, label_visibility="collapsed",
                            format_func=lambda n: f"{n} — {options[n]}")
        with st.expander("Use your own checkpoint"):
            uploaded = st.file_uploader(
                f"Weights for {name} ({', '.join(CHECKPOINT_TYPES)})", type=list(CHECKPOINT_TYPES),
                key=f"{key}_file",
            )
            url = st.text_input(f"…or a URL of weights for {name}", key=f"{key}_url",
                                placeholder="https://…/checkpoint.pth").strip()
    if uploaded is not None:
        path, file_name = _save_upload(uploaded)
        return ModelChoice(name, "file", path, file_name)
    if url:
        return ModelChoice(name, "url", url, Path(urlsplit(url).path).name or url)
    return ModelChoice(name, default_source(name))


@st.cache_resource(show_spinner=False)
def model_cache() -> ModelCache:
    """One per process: every session shares loaded models (read-only in eval mode)."""
    return ModelCache(MODEL_CACHE_BYTES)


def load(choice: ModelChoice) -> LoadedModel:
    """The loaded model, from the cache or (with a spinner) from its weights; raises WeightsError."""
    cache = model_cache()
    if choice.key in cache:
        return cache.get_or_load(choice.key, choice.load)
    with st.spinner(f"Loading {choice.label}…"):
        return cache.get_or_load(choice.key, choice.load)


def load_or_fallback(choice: ModelChoice, fallback: ModelChoice) -> tuple[LoadedModel, ModelChoice]:
    """Load ``choice``; if its weights fail, say why in one sentence and use the bundled ``fallback``."""
    failed: dict[tuple[Any, ...], str] = st.session_state.setdefault(FAILED_KEY, {})
    if choice.key not in failed:
        try:
            return load(choice), choice
        except WeightsError as exc:
            failed[choice.key] = str(exc)
    st.error(failed[choice.key])
    if st.button("Try loading it again", key=f"retry_{hashlib.sha1(repr(choice.key).encode()).hexdigest()[:8]}"):
        failed.pop(choice.key, None)
        st.rerun()
    st.info(f"Showing {fallback.label} instead.")
    return load(fallback), fallback


def _nbytes(value: Any) -> int:
    """Bytes of every tensor/array inside a (nested) result: what an analysis really costs."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if is_dataclass(value) and not isinstance(value, type):
        return sum(_nbytes(getattr(value, f.name)) for f in fields(value))
    return 0


@st.cache_resource(show_spinner=False)
def analysis_cache() -> ModelCache:
    """One per process, bounded by bytes; entries are read-only results keyed by image and model."""
    return ModelCache(ANALYSIS_CACHE_BYTES, sizeof=_nbytes)


@dataclass(frozen=True)
class Forward:
    """One forward pass worth of results: what ``run`` returned and the crop the model saw."""

    result: Any
    crop: np.ndarray  # (H, W, 3) uint8, pixel-aligned with the model input


def forward_once(
    what: str,
    image: ImageChoice,
    choice: ModelChoice,
    loaded: LoadedModel,
    run: Callable[[nn.Module, torch.Tensor], T],
) -> Forward:
    """Preprocess ``image`` for ``loaded`` and call ``run(model, x)``, once per (what, image, model).

    Later calls with the same key (any rerun: a click, a slider) return the cached result.
    """
    key = (what, image.digest, choice.key)
    cache = analysis_cache()

    def compute() -> Forward:
        x, crop = images.preprocess(image.image, loaded.pretrained_cfg)
        return Forward(run(loaded.model, x), crop)

    if key in cache:
        return cache.get_or_load(key, compute)
    with st.spinner(f"Running {choice.name} on the image…"):
        return cache.get_or_load(key, compute)


def analyse_or_stop(
    what: str,
    image: ImageChoice,
    choice: ModelChoice,
    fallback: ModelChoice,
    run: Callable[[nn.Module, torch.Tensor], T],
) -> tuple[Forward, ModelChoice, LoadedModel]:
    """Load ``choice`` (falling back to ``fallback``) and run the page's analysis once.

    A model the analysis cannot handle stops the page with one sentence, never a traceback.
    Returns (forward, the choice actually used, the loaded model).
    """
    loaded, used = load_or_fallback(choice, fallback)
    try:
        forward = forward_once(what, image, used, loaded, run)
    except (TypeError, ValueError) as exc:
        st.error(f"{used.label} cannot be analysed here: {exc}")
        st.stop()
    return forward, used, loaded


VIT_REFERENCE = ModelChoice("vit_cifar", "bundled")


def analyse_reference_vit(choice: ModelChoice, image: ImageChoice) -> tuple[Forward, str]:
    """The ViT attention that the FCViT and Conv2Former pages set beside their own maps."""
    forward, used, _ = analyse_or_stop("attention", image, choice, VIT_REFERENCE, attention.analyse_attention)
    return forward, used.name if used.weights == "bundled" else used.label

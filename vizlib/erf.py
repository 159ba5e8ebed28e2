"""Effective receptive field (ERF), following RepLKNet's ``erf/`` recipe (METHODS.md section 7).

Per image: s = sum_c ReLU(out[:, c, H//2, W//2]) at the centre of the last feature map, g = ReLU(ds/dx),
map = sum of g over batch and RGB; images whose map holds NaN (or inf) are skipped; the maps are averaged.
Analysis: d = log10(map + 1) / max, then the smallest centred square (side 2i+1, i >= 1) holding more than a
fraction t of sum(d) gives the area ratio r = side^2 / (H W).

:func:`erf_map` is the batched form: in eval mode samples are independent, so the gradient of the objective
summed over a batch is, for each sample, that sample's own input gradient, i.e. one backward per batch
instead of one per image. :func:`erf_map_sequential` is the literal one-image-at-a-time recipe, kept as the
reference the batched form is tested and benchmarked against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from captum.attr import Saliency
from PIL import Image
from torch import Tensor, nn

THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)
INIT_SEED = 0

FeatureFn = Callable[[nn.Module, Tensor], Tensor]
Progress = Callable[[float], None]
Cancel = Callable[[], bool]


class ErfCancelled(Exception):
    """Raised when the ``cancel`` check returns True; nothing partial is returned."""


# --- the feature map --------------------------------------------------------------------------------


def token_grid(model: nn.Module, input_hw: Sequence[int], num_patches: int) -> tuple[int, int]:
    """(h, w) of a ViT's patch-token grid for an input of ``input_hw`` pixels."""
    patch_embed = getattr(model, "patch_embed", None)
    candidates: list[tuple[int, int]] = []
    if patch_embed is not None:
        if hasattr(patch_embed, "dynamic_feat_size"):  # timm PatchEmbed: honours padding and strides
            candidates.append(tuple(int(v) for v in patch_embed.dynamic_feat_size(tuple(input_hw))))
        patch = getattr(patch_embed, "patch_size", None)
        if patch is not None:
            ph, pw = (patch, patch) if isinstance(patch, int) else patch
            candidates.append((int(input_hw[0]) // ph, int(input_hw[1]) // pw))
        grid = getattr(patch_embed, "grid_size", None)
        if grid is not None:
            candidates.append((int(grid[0]), int(grid[1])))
    side = math.isqrt(num_patches)
    candidates.append((side, side))  # last resort: a square grid
    for h, w in candidates:
        if h * w == num_patches:
            return h, w
    raise ValueError(f"cannot arrange {num_patches} patch tokens into a grid for a {tuple(input_hw)} input")


def tokens_to_map(model: nn.Module, tokens: Tensor, input_hw: Sequence[int]) -> Tensor:
    """(B, N, C) ViT tokens -> (B, C, h, w) patch map, prefix tokens (CLS, distillation, registers) dropped."""
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    patches = tokens[:, prefix:, :]
    h, w = token_grid(model, input_hw, patches.shape[1])
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def default_features(model: nn.Module, x: Tensor) -> Tensor:
    """The last feature map as (B, C, H, W): ``forward_features``, ViT tokens reshaped to their grid."""
    out: Any = model.forward_features(x)
    if isinstance(out, (list, tuple)):  # some models return every stage; the last one is the recipe's
        out = out[-1]
    if not isinstance(out, Tensor):
        raise TypeError(f"forward_features returned {type(out).__name__}, not a tensor")
    if out.ndim == 3:
        out = tokens_to_map(model, out, x.shape[-2:])
    if out.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) feature map, got shape {tuple(out.shape)}")
    return out


def centre_objective(features: Tensor) -> Tensor:
    """Per-sample s_b = sum_c ReLU(features[b, c, H//2, W//2]), shape (B,)."""
    h, w = features.shape[-2:]
    return F.relu(features[:, :, h // 2, w // 2]).sum(dim=1)


def gradient_maps(model: nn.Module, x: Tensor, feature_fn: FeatureFn | None = None) -> Tensor:
    """(B, H, W): each sample's ReLU'd input gradient of its own centre objective, summed over RGB.

    captum's ``Saliency`` (signed, ``abs=False``) computes it with one backward for the whole batch: a
    forward returning one scalar per sample needs no target, and with no cross-sample interaction (eval
    mode) d(sum_b s_b)/dx_b = ds_b/dx_b. The ReLU is applied per sample, before any sum over samples.
    """
    features_of = feature_fn or default_features

    def objective(inputs: Tensor) -> Tensor:
        return centre_objective(features_of(model, inputs))

    with torch.enable_grad():  # callers may sit inside torch.no_grad(); the input gradient is the point
        grad = Saliency(objective).attribute(x.detach().requires_grad_(True), abs=False)
    return F.relu(grad).sum(dim=1)


# --- accumulation -----------------------------------------------------------------------------------


@dataclass
class ErfAccumulation:
    """The mean ERF map and how many images went into it."""

    map: Tensor  # (H, W) float64, the mean over used images (before any log scaling)
    n_used: int
    n_skipped: int  # images whose map held NaN or inf
    skipped: list[int] = field(default_factory=list)  # their indices in the input
    feature_hw: tuple[int, int] = (0, 0)  # the last feature map's size; its centre point is the objective


def _check(model: nn.Module, images: Tensor) -> None:
    if model.training:
        # Train-mode BatchNorm mixes samples (batched != per-image) and the recipe uses model.eval().
        raise ValueError("the model must be in eval mode (model.eval()) for the ERF")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected images as a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")


def _finish(total: Tensor, used: int, skipped: list[int], feature_hw: tuple[int, int]) -> ErfAccumulation:
    if used == 0:
        raise ValueError(f"every one of the {len(skipped)} images gave a NaN map; nothing to average")
    return ErfAccumulation(total / used, used, len(skipped), skipped, feature_hw)


def erf_accumulate(
    model: nn.Module,
    images: Tensor,
    feature_fn: FeatureFn | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> ErfAccumulation:
    """Batched ERF over ``images`` (N, 3, S, S): one forward and one backward per batch.

    ``progress(fraction)`` is called after every batch (a Streamlit progress bar there is also the point
    where a rerun stops this loop); ``cancel()`` is checked before every batch and True raises
    :class:`ErfCancelled`.
    """
    _check(model, images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    features_of = feature_fn or default_features
    feature_hw: list[tuple[int, int]] = []

    def recording(model: nn.Module, x: Tensor) -> Tensor:
        out = features_of(model, x)
        feature_hw[:] = [(int(out.shape[-2]), int(out.shape[-1]))]
        return out

    count = images.shape[0]
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    used, skipped = 0, []
    for start in range(0, count, batch_size):
        if cancel is not None and cancel():
            raise ErfCancelled(f"cancelled after {start} of {count} images")
        maps = gradient_maps(model, images[start:start + batch_size], recording).to(torch.float64)
        finite = torch.isfinite(maps).flatten(1).all(dim=1)  # per image: a NaN map is skipped, not the batch
        skipped += [start + int(i) for i in torch.nonzero(~finite).flatten()]
        total += maps[finite].sum(dim=0)
        used += int(finite.sum())
        if progress is not None:
            progress(min(start + batch_size, count) / count)
    return _finish(total, used, skipped, feature_hw[0])


def erf_map(
    model: nn.Module,
    images: Tensor,
    feature_fn: FeatureFn | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> Tensor:
    """The mean ERF map (H, W) of ``images``, batched (see :func:`erf_accumulate`)."""
    return erf_accumulate(model, images, feature_fn, batch_size, progress, cancel).map


def erf_map_sequential(
    model: nn.Module,
    images: Tensor,
    feature_fn: FeatureFn | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> Tensor:
    """The recipe as written: batch 1, one forward and one backward per image, running mean."""
    _check(model, images)
    features_of = feature_fn or default_features
    count = images.shape[0]
    mean = torch.zeros(images.shape[-2:], dtype=torch.float64)
    used = 0
    for index in range(count):
        if cancel is not None and cancel():
            raise ErfCancelled(f"cancelled after {index} of {count} images")
        x = images[index:index + 1].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = features_of(model, x)
            h, w = out.shape[-2:]
            central = F.relu(out[:, :, h // 2, w // 2]).sum()
            (grad,) = torch.autograd.grad(central, x)
        contribution = F.relu(grad).sum(dim=(0, 1)).to(torch.float64)
        if torch.isfinite(contribution).all():
            used += 1
            mean += (contribution - mean) / used  # running mean (RepLKNet's AverageMeter)
        if progress is not None:
            progress((index + 1) / count)
    if used == 0:
        raise ValueError(f"every one of the {count} images gave a NaN map; nothing to average")
    return mean


# --- analysis ---------------------------------------------------------------------------------------


def log_normalised(erf: Tensor) -> Tensor:
    """d = log10(map + 1) / max: the log evens out magnitudes, the max makes models comparable."""
    d = torch.log10(erf.to(torch.float64) + 1.0)
    peak = d.max()
    return d / peak if peak > 0 else torch.zeros_like(d)


def square_sides(erf: Tensor, thresholds: Sequence[float] = THRESHOLDS) -> dict[float, int]:
    """Side of the smallest centred square (2i+1, i >= 1) with more than ``t`` of sum(d), per threshold.

    RepLKNet stops at i = min(H, W)//2 - 1 and has no answer beyond; here that case is the whole input
    (side max(H, W), area ratio 1), the only region left that holds more than ``t``.
    """
    d = log_normalised(erf)
    h, w = d.shape
    total = float(d.sum())
    sides: dict[float, int] = {}
    for t in thresholds:
        side = max(h, w)
        if total > 0:
            for i in range(1, min(h, w) // 2):
                square = d[h // 2 - i:h // 2 + i + 1, w // 2 - i:w // 2 + i + 1]
                if float(square.sum()) / total > t:
                    side = 2 * i + 1
                    break
        sides[float(t)] = side
    return sides


def area_ratios(erf: Tensor, thresholds: Sequence[float] = THRESHOLDS) -> dict[float, float]:
    """Area ratio r = side^2 / (H W) of the high-contribution square at each threshold (NaN: empty map)."""
    h, w = erf.shape
    if float(log_normalised(erf).sum()) <= 0:
        return {float(t): math.nan for t in thresholds}
    return {t: min(side * side / (h * w), 1.0) for t, side in square_sides(erf, thresholds).items()}


# --- inputs and models ------------------------------------------------------------------------------


def prepare_images(pictures: Sequence[Image.Image], pretrained_cfg: dict[str, Any], size: int) -> Tensor:
    """(N, 3, size, size): each picture through the model's eval transform with its input size set to ``size``."""
    from vizlib.images import preprocess

    cfg = {**pretrained_cfg, "input_size": (3, int(size), int(size))}
    return torch.cat([preprocess(picture, cfg)[0] for picture in pictures])


def native_size(pretrained_cfg: dict[str, Any]) -> int:
    """The input side a model was configured (and trained) for, e.g. 32 for the CIFAR zoo."""
    return int(tuple(pretrained_cfg.get("input_size", (3, 224, 224)))[-1])


@dataclass
class ErfModel:
    """A model ready for the ERF, with the words that say which weights it carries."""

    model: nn.Module
    name: str
    weights: str  # e.g. "bundled checkpoint cetnet_cifar_ce3 ..." or "random initialisation (seed 0)"
    pretrained_cfg: dict[str, Any]
    trained: bool


def init_model(name: str, seed: int = INIT_SEED, **model_kwargs: Any) -> ErfModel:
    """``name`` (a model or bundled checkpoint id) at its random initialisation, seeded, in eval mode."""
    import timm

    from vizlib.weights import WeightsError, find_checkpoint, register_project_models

    register_project_models()
    info = find_checkpoint(name)
    arch, kwargs = name, dict(model_kwargs)
    if info is not None and info.checkpoint_id == name:  # a checkpoint id names an architecture + kwargs
        arch, kwargs = info.model, {**info.model_kwargs, **model_kwargs}
    if not timm.is_model(arch):
        raise WeightsError(f"{name!r} is neither a registered model nor a bundled checkpoint.")
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random stream
        torch.manual_seed(seed)
        try:
            model = timm.create_model(arch, **kwargs)
        except TypeError as exc:
            raise WeightsError(f"Model {arch!r} does not accept the options {kwargs} ({exc}).") from None
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    return ErfModel(model.eval(), arch, f"random initialisation (seed {seed})", cfg, trained=False)


def load_erf_model(name: str, weights: str = "bundled", size: int | None = None, seed: int = INIT_SEED,
                   **model_kwargs: Any) -> ErfModel:
    """Load ``name`` for an ERF at ``size`` px: ``weights`` is bundled, hub, a file path, or ``init``.

    A timm ViT asked for another size than its own is rebuilt with ``dynamic_img_size=True`` (position
    embeddings resampled), which every other architecture here handles natively.
    """
    from vizlib.weights import WeightsError, load_model

    def build(**extra: Any) -> ErfModel:
        if str(weights).strip().lower() == "init":
            return init_model(name, seed, **model_kwargs, **extra)
        loaded = load_model(name, weights, **model_kwargs, **extra)
        return ErfModel(loaded.model, loaded.name, loaded.weights, loaded.pretrained_cfg, trained=True)

    built = build()
    if size is not None and size != native_size(built.pretrained_cfg) and hasattr(built.model, "dynamic_img_size"):
        try:
            return build(dynamic_img_size=True)
        except WeightsError:
            return built
    return built

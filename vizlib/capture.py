"""Capture the internal maps of any HybridLens model, safely under concurrent sessions.

Everything goes through :mod:`models.capture` (a per-thread recorder; see its docstring for why
not hooks or timm's fx ``AttentionExtract``). timm ViTs run :func:`models.vit.forward_with_attention`,
every other model in the zoo records from inside its own modules.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from models.capture import capturing
from models.vit import forward_with_attention, is_timm_vit

ATTENTION_KEY = ".attn"


def capture_maps(
    model: nn.Module,
    x: torch.Tensor,
    select: Callable[[str], bool] | None = None,
    grad: bool = False,
) -> tuple[torch.Tensor, OrderedDict[str, Any]]:
    """Run ``model`` on ``x`` and return its output and every recorded map, in execution order."""
    with torch.set_grad_enabled(grad), capturing(select, detach=not grad) as maps:
        output = forward_with_attention(model, x) if is_timm_vit(model) else model(x)
    return output, maps


def _is_square_attention(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-1] == value.shape[-2]


def attention_maps(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, OrderedDict[str, torch.Tensor]]:
    """The model output and an ordered mapping layer name -> (B, heads, N, N) attention, depth order.

    Layer names are module paths (``blocks.3.attn``); only square token-to-token attention is
    returned (cross-attention and windowed maps are available from :func:`capture_maps`).
    """
    output, maps = capture_maps(model, x, select=lambda name: name.endswith(ATTENTION_KEY))
    layers: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, value in maps.items():
        if _is_square_attention(value):
            layers[name[: -len(ATTENTION_KEY)]] = value
    return output, layers


def num_prefix_tokens(model: nn.Module) -> int:
    """Class, distillation and register tokens before the patch tokens (0 for models without)."""
    return int(getattr(model, "num_prefix_tokens", 0))


def patch_geometry(model: nn.Module, x: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """(grid (h, w), patch size (py, px)) of a ViT for input ``x``, from the patch embedding itself.

    Never inferred as sqrt(N - 1): distilled and register models have more prefix tokens.
    """
    patch_embed = model.patch_embed
    patch = tuple(int(p) for p in patch_embed.patch_size)
    if hasattr(patch_embed, "dynamic_feat_size"):
        grid = patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    else:
        grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
    return (int(grid[0]), int(grid[1])), (patch[0], patch[1])

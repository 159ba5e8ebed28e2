"""Attention metrics of the FCViT observation, defined exactly as in the project's issue #2.

Every per-head metric takes one layer's attention ``attn`` of shape (heads, N, N) (rows are queries,
softmax over keys) and ``num_prefix_tokens`` p, and works on the patch block
``Ã = A[p:, p:]`` with each row renormalised to sum 1. It returns one value per head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

EPS = 1e-12
METRIC_NAMES = ("query_independence", "entropy", "topk_mass", "gini", "mean_attention_distance")


def patch_block(attn: torch.Tensor | Sequence[torch.Tensor], num_prefix_tokens: int) -> torch.Tensor:
    """Ã: patch-to-patch attention with every query row renormalised to sum 1.

    Accepts (heads, N, N), a stack of layers (layers, heads, N, N), or a list of (heads, N, N)
    layers (renormalised straight into one stacked block, saving a copy); float32 is precise enough
    (the tests check 1e-6 against float64) and several times faster on CPU.
    """
    if not isinstance(attn, torch.Tensor):
        first = patch_block(attn[0], num_prefix_tokens)
        block = first.new_empty((len(attn), *first.shape))
        block[0] = first
        for depth, layer in enumerate(attn[1:], start=1):
            part = layer[..., num_prefix_tokens:, num_prefix_tokens:]
            torch.div(part, part.sum(dim=-1, keepdim=True).clamp_min(EPS), out=block[depth])
        return block
    if attn.dim() not in (3, 4) or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected one layer's attention of shape (heads, N, N), got {tuple(attn.shape)}")
    block = attn[..., num_prefix_tokens:, num_prefix_tokens:]
    if not block.is_floating_point() or block.dtype in (torch.float16, torch.bfloat16):
        block = block.float()
    return block / block.sum(dim=-1, keepdim=True).clamp_min(EPS)


def query_independence(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Mean cosine similarity over all query pairs i<j of their maps; 1 = every query sees the same."""
    return _query_independence(patch_block(attn, num_prefix_tokens))


def _unit_rows(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1/‖a_i‖ per row (0 for an all-zero row) and ‖r̂_i‖² (1, or 0 for that row).

    The unit rows r̂_i = a_i/‖a_i‖ are never materialised: the sums the two independence metrics
    need are contractions of the block with these scales (no extra block-sized temporary).
    """
    norms = torch.linalg.vector_norm(block, dim=-1)
    nonzero = norms > 0
    return torch.where(nonzero, 1.0 / norms.clamp_min(EPS), 0.0), nonzero.to(block.dtype)


def _query_independence(block: torch.Tensor, unit: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    # Σ_{i≠j} cos(i, j) = ‖Σ_i r̂_i‖² − Σ_i ‖r̂_i‖²: O(P²) instead of the O(P³) Gram matrix.
    inverse_norms, squared_norms = unit if unit is not None else _unit_rows(block)
    queries = block.shape[-2]
    summed = (inverse_norms.unsqueeze(-2) @ block).squeeze(-2)  # Σ_i r̂_i, (..., P)
    off_diagonal = summed.square().sum(-1) - squared_norms.sum(-1)
    return off_diagonal / (queries * (queries - 1))


def head_independence(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Mean over queries and head pairs h<h' of the cosine of their maps (NaN for one head)."""
    return _head_independence(patch_block(attn, num_prefix_tokens))


def _head_independence(block: torch.Tensor, unit: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    # Same identity as above, over the head axis for each query.
    inverse_norms, squared_norms = unit if unit is not None else _unit_rows(block)  # (..., heads, P) each
    heads = block.shape[-3]
    if heads < 2:
        return torch.full(block.shape[:-3], float("nan"), dtype=block.dtype)
    summed = torch.einsum("...hqk,...hq->...qk", block, inverse_norms)  # Σ_h r̂_h,i, (..., P, P)
    off_diagonal = summed.square().sum(-1) - squared_norms.sum(-2)  # (..., P)
    return (off_diagonal / (heads * (heads - 1))).mean(-1)


def entropy(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Mean normalised entropy H(Ã_i)/log(P): 1 is uniform, near 0 is sparse (0·log 0 = 0)."""
    return _entropy(patch_block(attn, num_prefix_tokens))


def _entropy(rows: torch.Tensor) -> torch.Tensor:
    keys = rows.shape[-1]
    if keys < 2:
        return torch.zeros(rows.shape[:-2], dtype=rows.dtype)
    h = torch.special.entr(rows).sum(-1)  # -a·log a with 0·log 0 = 0, one fused op
    return h.mean(-1) / math.log(keys)


def topk_count(num_patches: int) -> int:
    """k = max(1, round(0.05·P)), with Python's round (half to even)."""
    return max(1, round(0.05 * num_patches))


def topk_mass(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Mean over queries of the mass held by the k = max(1, round(0.05·P)) largest keys."""
    return _topk_mass(patch_block(attn, num_prefix_tokens))


def _topk_mass(rows: torch.Tensor, ascending: torch.Tensor | None = None) -> torch.Tensor:
    k = topk_count(rows.shape[-1])
    if ascending is not None:  # reuse the sort Gini needs anyway
        return ascending[..., -k:].sum(-1).mean(-1)
    return rows.topk(k, dim=-1).values.sum(-1).mean(-1)


def gini(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Mean Gini coefficient of the query rows: 0 uniform, (P-1)/P one-hot."""
    return _gini(patch_block(attn, num_prefix_tokens))


def _gini(rows: torch.Tensor, ascending: torch.Tensor | None = None) -> torch.Tensor:
    keys = rows.shape[-1]
    if ascending is None:
        ascending = _sorted_rows(rows)
    ranks = torch.arange(1, keys + 1, dtype=rows.dtype)  # a_(i) ascending, i = 1..K
    weights = 2 * ranks - keys - 1
    return ((ascending @ weights) / keys).mean(-1)  # a matrix-vector product: no row-sized temporary


def patch_centres(grid: Sequence[int], patch_size: int | Sequence[int]) -> torch.Tensor:
    """Centres (y, x) in input pixels of the row-major patch grid, shape (h·w, 2)."""
    height, width = grid
    size_y, size_x = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) * size_y
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) * size_x
    return torch.cartesian_prod(ys, xs)


def mean_attention_distance(
    attn: torch.Tensor,
    num_prefix_tokens: int,
    grid: Sequence[int],
    patch_size: int | Sequence[int],
) -> torch.Tensor:
    """Mean over queries of Σ_j Ã_ij·‖c_i − c_j‖ in input pixels (rows renormalised)."""
    return _mean_attention_distance(patch_block(attn, num_prefix_tokens), grid, patch_size)


def _mean_attention_distance(
    rows: torch.Tensor, grid: Sequence[int], patch_size: int | Sequence[int]
) -> torch.Tensor:
    centres = patch_centres(grid, patch_size)
    if centres.shape[0] != rows.shape[-1]:
        raise ValueError(f"grid {tuple(grid)} has {centres.shape[0]} patches, attention has {rows.shape[-1]}")
    distances = torch.cdist(centres, centres).to(rows.dtype)
    return (rows * distances).sum(-1).mean(-1)


def rollout(
    attns: Sequence[torch.Tensor], num_prefix_tokens: int, grid: Sequence[int] | None = None
) -> torch.Tensor:
    """Abnar & Zuidema rollout: R = Π_l rownorm(½(Ā_l + I)), layers in forward order.

    Returns the (h, w) map: the first prefix token's (CLS) row over patch keys, or the mean over
    patch query rows when there is no prefix token. ``grid`` defaults to a square grid.
    """
    tokens = attns[0].shape[-1]
    result = torch.eye(tokens, dtype=torch.float64)
    identity = torch.eye(tokens, dtype=torch.float64)
    for attn in attns:
        mixed = 0.5 * attn.mean(0, dtype=torch.float64) + 0.5 * identity
        mixed = mixed / mixed.sum(-1, keepdim=True)
        result = mixed @ result
    if num_prefix_tokens > 0:
        patch_map = result[0, num_prefix_tokens:]
    else:
        patch_map = result[num_prefix_tokens:, num_prefix_tokens:].mean(0)
    return patch_map.reshape(*_grid_or_square(grid, patch_map.numel()))


def _grid_or_square(grid: Sequence[int] | None, patches: int) -> tuple[int, int]:
    if grid is not None:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patches do not form a square grid; pass grid=(h, w)")
    return side, side


def query_maps(
    attn: torch.Tensor, num_prefix_tokens: int, queries: Sequence[int], grid: Sequence[int]
) -> torch.Tensor:
    """The paper's figure view: the (renormalised) maps of several query patches, (len(q), h, w)."""
    rows = patch_block(attn, num_prefix_tokens)[:, list(queries)]  # (heads, q, P)
    return rows.reshape(rows.shape[0], len(queries), int(grid[0]), int(grid[1]))


def _sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows sorted ascending. On CPU NumPy's SIMD sort is about 7x faster than torch.sort for
    many short rows (measured: 18 vs 130 ms for ViT-B's 12x12x196 rows of 196), and the sort is
    the largest cost of the metrics."""
    if rows.device.type == "cpu" and not rows.requires_grad:
        return torch.from_numpy(np.sort(rows.contiguous().numpy(), axis=-1))
    return rows.sort(dim=-1).values


def row_sparsity(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropy, top-k mass and Gini of distributions ``rows`` (..., queries, P), each row summing to 1,
    averaged over queries: the sparsity part of :func:`layer_metrics` for maps that are not an N x N
    attention (e.g. FCViT's one context map shared by every query)."""
    ascending = _sorted_rows(rows)
    return {"entropy": _entropy(rows), "topk_mass": _topk_mass(rows, ascending), "gini": _gini(rows, ascending)}


def layer_metrics(
    attn: torch.Tensor | Sequence[torch.Tensor],
    num_prefix_tokens: int,
    grid: Sequence[int],
    patch_size: int | Sequence[int],
) -> dict[str, torch.Tensor]:
    """Every metric of one layer (heads, N, N), or of several layers at once, stacked
    (layers, heads, N, N) or as a list (one vectorised pass, what the page uses), from a single Ã."""
    block = patch_block(attn, num_prefix_tokens)
    unit = _unit_rows(block)
    return {
        "query_independence": _query_independence(block, unit),
        **row_sparsity(block),
        "mean_attention_distance": _mean_attention_distance(block, grid, patch_size),
        "head_independence": _head_independence(block, unit),
    }

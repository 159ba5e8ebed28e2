"""vizlib.metrics against closed forms on small matrices and an independent NumPy loop version."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vizlib import metrics


def reference_metrics(attn: np.ndarray, p: int, grid: tuple[int, int], patch: int) -> dict[str, np.ndarray]:
    """Plain loops over the issue's definitions, float64, sharing no code with vizlib."""
    heads = attn.shape[0]
    block = attn[:, p:, p:].astype(np.float64)
    block = block / block.sum(-1, keepdims=True)
    n = block.shape[-1]
    k = max(1, round(0.05 * n))
    centres = np.array([((r + 0.5) * patch, (c + 0.5) * patch) for r in range(grid[0]) for c in range(grid[1])])
    out: dict[str, list] = {m: [] for m in metrics.METRIC_NAMES}
    for h in range(heads):
        rows = block[h]
        cos = [
            rows[i] @ rows[j] / (np.linalg.norm(rows[i]) * np.linalg.norm(rows[j]))
            for i in range(n) for j in range(i + 1, n)
        ]
        out["query_independence"].append(np.mean(cos))
        ent = [-sum(a * math.log(a) for a in row if a > 0) / math.log(n) for row in rows]
        out["entropy"].append(np.mean(ent))
        out["topk_mass"].append(np.mean([np.sort(row)[::-1][:k].sum() for row in rows]))
        ginis = []
        for row in rows:
            a = np.sort(row)
            ginis.append(sum((2 * (i + 1) - n - 1) * a[i] for i in range(n)) / n)
        out["gini"].append(np.mean(ginis))
        mad = [sum(rows[i, j] * np.linalg.norm(centres[i] - centres[j]) for j in range(n)) for i in range(n)]
        out["mean_attention_distance"].append(np.mean(mad))
    pairs = []
    for i in range(n):
        for h in range(heads):
            for g in range(h + 1, heads):
                a, b = block[h, i], block[g, i]
                pairs.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    result = {m: np.array(v) for m, v in out.items()}
    result["head_independence"] = np.array(np.mean(pairs))
    return result


def random_attention(heads: int, tokens: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(heads, tokens, tokens, generator=generator) * temperature).softmax(-1)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_metrics_match_independent_loops(prefix: int) -> None:
    grid = (3, 4)
    attn = random_attention(3, prefix + 12, seed=prefix, temperature=3.0)
    expected = reference_metrics(attn.numpy(), prefix, grid, patch=16)
    got = metrics.layer_metrics(attn, prefix, grid, 16)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name].double().numpy(), value, rtol=1e-5, atol=1e-6, err_msg=name)
    # The single-metric public functions agree with the vectorised one.
    np.testing.assert_allclose(metrics.query_independence(attn, prefix), got["query_independence"], rtol=1e-6)
    np.testing.assert_allclose(metrics.gini(attn, prefix), got["gini"], rtol=1e-6)
    np.testing.assert_allclose(
        metrics.mean_attention_distance(attn, prefix, grid, 16), got["mean_attention_distance"], rtol=1e-6
    )


def test_stacked_layers_equal_one_layer_at_a_time() -> None:
    layers = torch.stack([random_attention(4, 17, seed=s) for s in range(3)])
    stacked = metrics.layer_metrics(layers, 1, (4, 4), 8)
    as_list = metrics.layer_metrics(list(layers), 1, (4, 4), 8)
    for name in stacked:
        torch.testing.assert_close(as_list[name], stacked[name])
    for depth in range(3):
        single = metrics.layer_metrics(layers[depth], 1, (4, 4), 8)
        for name in single:
            torch.testing.assert_close(stacked[name][depth], single[name])


def test_uniform_rows() -> None:
    patches = 16
    attn = torch.full((2, patches + 1, patches + 1), 1.0 / (patches + 1))
    got = metrics.layer_metrics(attn, 1, (4, 4), 16)
    torch.testing.assert_close(got["query_independence"], torch.ones(2))
    torch.testing.assert_close(got["head_independence"], torch.tensor(1.0))
    torch.testing.assert_close(got["entropy"], torch.ones(2))
    torch.testing.assert_close(got["topk_mass"], torch.full((2,), 1 / patches))  # k = round(0.8) = 1
    torch.testing.assert_close(got["gini"], torch.zeros(2), atol=1e-7, rtol=0)


def test_identity_is_maximally_sparse_and_query_specific() -> None:
    patches = 9
    attn = torch.eye(patches).expand(3, patches, patches)
    got = metrics.layer_metrics(attn, 0, (3, 3), 10)
    torch.testing.assert_close(got["query_independence"], torch.zeros(3))
    torch.testing.assert_close(got["entropy"], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["topk_mass"], torch.ones(3))
    torch.testing.assert_close(got["gini"], torch.full((3,), (patches - 1) / patches))
    torch.testing.assert_close(got["mean_attention_distance"], torch.zeros(3))
    torch.testing.assert_close(got["head_independence"], torch.tensor(1.0))


def test_permutation_distance_and_head_disagreement() -> None:
    # Head 0 looks at itself, head 1 at the patch to its right (wrapping): heads never agree.
    grid, patch = (2, 3), 10
    n = grid[0] * grid[1]
    shift = [(i // 3) * 3 + (i % 3 + 1) % 3 for i in range(n)]
    attn = torch.stack([torch.eye(n), torch.eye(n)[shift]])
    got = metrics.layer_metrics(attn, 0, grid, patch)
    assert float(got["head_independence"]) == 0.0
    # Right neighbour is 10 px away twice per row, the wrap 20 px once: mean 40/3.
    assert got["mean_attention_distance"][1].item() == pytest.approx(40 / 3)
    assert got["mean_attention_distance"][0].item() == 0.0


def test_prefix_columns_are_dropped_and_rows_renormalised() -> None:
    # Every patch query puts 90% on the CLS token and spreads the rest uniformly: after
    # renormalisation it is uniform over patches.
    patches = 4
    attn = torch.zeros(1, patches + 1, patches + 1)
    attn[:, :, 0] = 0.9
    attn[:, :, 1:] = 0.1 / patches
    assert metrics.entropy(attn, 1).item() == pytest.approx(1.0)
    assert metrics.entropy(attn, 0).item() < 0.6


def test_single_head_independence_is_nan() -> None:
    assert math.isnan(metrics.head_independence(random_attention(1, 5, seed=0), 0).item())


def reference_rollout(attns: list[np.ndarray], p: int) -> np.ndarray:
    n = attns[0].shape[-1]
    result = np.eye(n)
    for attn in attns:
        a = 0.5 * attn.mean(0) + 0.5 * np.eye(n)
        a = a / a.sum(-1, keepdims=True)
        result = a @ result
    return result[0, p:] if p else result[:, :].mean(0)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_rollout_matches_direct_formula(prefix: int) -> None:
    attns = [random_attention(3, prefix + 16, seed=s) for s in range(4)]
    expected = reference_rollout([a.double().numpy() for a in attns], prefix)
    got = metrics.rollout(attns, prefix)
    assert got.shape == (4, 4)
    np.testing.assert_allclose(got.flatten().numpy(), expected, rtol=1e-10)


def test_rollout_non_square_grid_needs_grid() -> None:
    attns = [random_attention(2, 1 + 6, seed=0)]
    assert metrics.rollout(attns, 1, grid=(2, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match="square"):
        metrics.rollout(attns, 1)


def test_rollout_of_uniform_attention_is_uniform() -> None:
    n = 10
    attns = [torch.full((2, n, n), 1.0 / n)] * 3
    got = metrics.rollout(attns, 1, grid=(3, 3))
    # R = (½U + ½I)^3 applied to the CLS row: CLS keeps 1/8 + 7/8·(1/n), every patch the same.
    torch.testing.assert_close(got, torch.full((3, 3), 7 / 8 / n, dtype=torch.float64))


def test_query_maps_are_rows_of_the_renormalised_block() -> None:
    attn = random_attention(2, 1 + 9, seed=3)
    maps = metrics.query_maps(attn, 1, [0, 4, 8], (3, 3))
    assert maps.shape == (2, 3, 3, 3)
    block = metrics.patch_block(attn, 1)
    torch.testing.assert_close(maps[1, 2].flatten(), block[1, 8])
    torch.testing.assert_close(maps.sum((-1, -2)), torch.ones(2, 3))

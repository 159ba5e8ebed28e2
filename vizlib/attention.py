"""One forward pass, every attention number: what the ViT attention page and CLI show.

The analysis keeps all maps, so choosing another query patch, layer or head is a lookup and
never a new forward pass.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from vizlib import metrics
from vizlib.capture import attention_maps, num_prefix_tokens, patch_geometry


@dataclass
class AttentionAnalysis:
    """Attention of one image through a ViT, with per-layer metrics and rollout."""

    logits: torch.Tensor  # (classes,)
    layers: OrderedDict[str, torch.Tensor]  # name -> (heads, N, N)
    num_prefix_tokens: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    layer_metrics: list[dict[str, torch.Tensor]] = field(default_factory=list)
    rollout: torch.Tensor | None = None  # (h, w)

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def num_heads(self) -> int:
        return next(iter(self.layers.values())).shape[0]

    def query_map(self, layer: int, head: int | None, query: int) -> torch.Tensor:
        """(h, w) map of patch ``query`` (row-major index) at a layer; ``head=None`` averages heads."""
        attn = self.layers[self.layer_names[layer]]
        maps = metrics.query_maps(attn, self.num_prefix_tokens, [query], self.grid)[:, 0]
        return maps.mean(0) if head is None else maps[head]

    def head_maps(self, layer: int, query: int) -> torch.Tensor:
        """(heads, h, w): every head's map of one query at one layer."""
        attn = self.layers[self.layer_names[layer]]
        return metrics.query_maps(attn, self.num_prefix_tokens, [query], self.grid)[:, 0]

    def metric_table(self) -> list[dict[str, float | int | str]]:
        """Long table: one row per (layer, head) with every metric; head_independence per layer."""
        rows: list[dict[str, float | int | str]] = []
        for depth, (name, values) in enumerate(zip(self.layer_names, self.layer_metrics, strict=True)):
            for head in range(self.num_heads):
                row: dict[str, float | int | str] = {"layer": depth, "name": name, "head": head}
                for metric in metrics.METRIC_NAMES:
                    row[metric] = float(values[metric][head])
                row["head_independence"] = float(values["head_independence"])
                rows.append(row)
        return rows

    def layer_means(self) -> dict[str, list[float]]:
        """Per metric, the head-mean of each layer in depth order (the page's curves)."""
        curves = {m: [float(v[m].mean()) for v in self.layer_metrics] for m in metrics.METRIC_NAMES}
        curves["head_independence"] = [float(v["head_independence"]) for v in self.layer_metrics]
        return curves


@torch.inference_mode()
def analyse_attention(model: nn.Module, x: torch.Tensor) -> AttentionAnalysis:
    """Capture every layer's attention for a single image (1, 3, H, W) and measure it."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, 3, H, W), got {tuple(x.shape)}")
    output, maps = attention_maps(model, x)
    if not maps:
        raise ValueError(f"{type(model).__name__} recorded no token-to-token attention")
    prefix = num_prefix_tokens(model)
    grid, patch = patch_geometry(model, x)
    layers = OrderedDict((name, attn[0]) for name, attn in maps.items())
    stacked = metrics.layer_metrics(list(layers.values()), prefix, grid, patch)
    per_layer = [{name: values[depth] for name, values in stacked.items()} for depth in range(len(layers))]
    return AttentionAnalysis(
        logits=output[0],
        layers=layers,
        num_prefix_tokens=prefix,
        grid=grid,
        patch_size=patch,
        layer_metrics=per_layer,
        rollout=metrics.rollout(list(layers.values()), prefix, grid),
    )

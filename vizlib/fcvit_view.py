"""FCViT global context: one forward pass, every GlobalContext map and the numbers the page shows.

FCViT (arXiv 2212.12552) replaces attention by a *query-independent* global context: per head h one
similarity map S_h(i) = <x_i^h, g_h>/sqrt(d) of every position with the spatial mean g, standardised
(S') and rescaled (S'' = alpha_h S'_h + beta_h), then spread over the channels as the context.

How the maps are compared with ViT attention (METHODS.md section 8): S'' is a standardised score, not
a distribution, so each head's map goes through a softmax over positions (temperature 1, the operation
attention applies to its logits). Every query of the block receives that *same* row, so the FCViT
"attention matrix" is the (P, P) matrix whose rows all equal softmax(S''_h); the ViT metrics of
:mod:`vizlib.metrics` are then applied unchanged. Its query-independence is 1 by construction; the
entropy, top-5% mass and Gini say how spread or peaked the shared map is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots
from torch import nn

from vizlib import metrics
from vizlib.attention import AttentionAnalysis
from vizlib.capture import capture_maps

GC_MARKER = ".token_mixer.gc"
KEYS = ("similarity", "similarity_norm", "similarity_rescaled", "context")
MAP_KINDS: dict[str, str] = {
    "similarity_rescaled": "S″ = α·S′ + β (what the block uses)",
    "similarity_norm": "S′ (standardised)",
    "similarity": "S = ⟨x_i, g⟩/√d (raw)",
    "distribution": "softmax of S″ over positions",
}
HEAD_METRICS = ("spatial_std", "entropy", "topk_mass", "gini")
COMPARED = ("query_independence", "entropy", "topk_mass", "gini", "mean_attention_distance")


@dataclass
class GlobalContextMaps:
    """The maps of one GlobalContext module for one image; (heads, h, w) unless noted."""

    name: str  # module path, e.g. network.0.1.token_mixer.gc1
    block: str  # network.0.1
    module: str  # gc1 or gc2
    grid: tuple[int, int]
    stride: tuple[float, float]  # input pixels per map cell (y, x)
    similarity: torch.Tensor  # S
    similarity_norm: torch.Tensor  # S'
    similarity_rescaled: torch.Tensor  # S''
    distribution: torch.Tensor  # softmax over positions of S'' per head
    context: torch.Tensor  # (h, w): L2 norm over channels of the context added to the input
    rescale_weight: torch.Tensor  # alpha (heads,)
    rescale_bias: torch.Tensor  # beta (heads,)
    head_metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (heads,)
    head_independence: float = float("nan")

    @property
    def num_heads(self) -> int:
        return int(self.similarity.shape[0])

    def maps(self, kind: str) -> torch.Tensor:
        """(heads, h, w) maps of one of :data:`MAP_KINDS`."""
        if kind not in MAP_KINDS:
            raise ValueError(f"unknown map kind {kind!r}; choose one of {list(MAP_KINDS)}")
        return getattr(self, kind)


@dataclass
class FCViTAnalysis:
    """Every GlobalContext module of one image in execution order, with depth trends."""

    logits: torch.Tensor  # (classes,)
    input_size: tuple[int, int]
    modules: list[GlobalContextMaps]
    depth: dict[str, list[float]]  # per module, in order: see depth_trends
    last: dict[str, torch.Tensor]  # vizlib.metrics.layer_metrics of the last module's shared rows

    @property
    def blocks(self) -> list[str]:
        return list(dict.fromkeys(m.block for m in self.modules))

    @property
    def num_heads(self) -> int:
        return self.modules[0].num_heads

    def module(self, block: str, which: str) -> GlobalContextMaps:
        for maps in self.modules:
            if maps.block == block and maps.module == which:
                return maps
        raise KeyError(f"no GlobalContext {which} in block {block}")

    def module_labels(self) -> list[str]:
        return [f"{block_label(m.block)} · {m.module}" for m in self.modules]

    def head_table(self, block: str, which: str) -> list[dict[str, float | int]]:
        """One row per head: learned alpha/beta and the metrics of its shared map."""
        maps = self.module(block, which)
        rows: list[dict[str, float | int]] = []
        for head in range(maps.num_heads):
            row: dict[str, float | int] = {
                "head": head + 1,
                "alpha": float(maps.rescale_weight[head]),
                "beta": float(maps.rescale_bias[head]),
            }
            row.update({name: float(maps.head_metrics[name][head]) for name in HEAD_METRICS})
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (the CLI payload without the ViT side)."""
        modules = []
        for index, maps in enumerate(self.modules):
            modules.append({
                "name": maps.name,
                "block": maps.block,
                "module": maps.module,
                "grid": list(maps.grid),
                "rescale_weight": maps.rescale_weight.tolist(),
                "rescale_bias": maps.rescale_bias.tolist(),
                **{name: maps.head_metrics[name].tolist() for name in HEAD_METRICS},
                "head_independence": maps.head_independence,
                "context_norm_mean": float(maps.context.mean()),
                "correlation_with_previous": _json_float(self.depth["correlation_with_previous"][index]),
            })
        last = {name: self.last[name].tolist() for name in COMPARED}
        return {
            "input_size": list(self.input_size),
            "num_heads": self.num_heads,
            "modules": modules,
            "last_module": {"name": self.modules[-1].name, **last},
        }


def block_label(block: str) -> str:
    """``network.2.1`` -> ``stage 2 · block 2`` (stages sit at even ``network`` indices)."""
    parts = block.split(".")
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return f"stage {int(parts[1]) // 2 + 1} · block {int(parts[2]) + 1}"
    return block


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def shared_rows(distribution: torch.Tensor) -> torch.Tensor:
    """(heads, P, P) attention in which every query row is the head's one distribution (a view)."""
    heads = distribution.shape[0]
    rows = distribution.reshape(heads, 1, -1)
    return rows.expand(heads, rows.shape[-1], rows.shape[-1])


def row_metrics(distribution: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropy, top-5% mass and Gini of each head's distribution (heads, h, w), with the formulas of
    vizlib.metrics applied to the single row every query shares (no P x P matrix needed)."""
    rows = distribution.reshape(distribution.shape[0], 1, -1).double()
    return {name: value.float() for name, value in metrics.row_sparsity(rows).items()}


def head_cosine(distribution: torch.Tensor) -> float:
    """Mean cosine over head pairs of their maps (1 = every head highlights the same places)."""
    heads = distribution.shape[0]
    if heads < 2:
        return float("nan")
    unit = F.normalize(distribution.reshape(heads, -1).double(), dim=-1)
    gram = unit @ unit.T
    return float((gram.sum() - gram.diagonal().sum()) / (heads * (heads - 1)))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps of any shape with the same number of values (NaN if constant)."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


def to_common_grid(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the finer of two (h, w) maps onto the coarser grid, so positions line up."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))

    def pool(m: torch.Tensor) -> torch.Tensor:
        if tuple(m.shape[-2:]) == size:
            return m.double()
        return F.adaptive_avg_pool2d(m.double()[None, None], size)[0, 0]

    return pool(a), pool(b)


def depth_trends(modules: Sequence[GlobalContextMaps]) -> dict[str, list[float]]:
    """Per module in order: head-mean spatial std of S'', head-mean entropy of softmax(S''), and the
    correlation of the head-mean S'' map with the previous module's (finer map pooled to the coarser)."""
    spatial = [float(m.head_metrics["spatial_std"].mean()) for m in modules]
    entropy = [float(m.head_metrics["entropy"].mean()) for m in modules]
    correlation = [float("nan")]
    for previous, current in zip(modules, modules[1:], strict=False):
        correlation.append(pearson(*to_common_grid(previous.similarity_rescaled.mean(0),
                                                   current.similarity_rescaled.mean(0))))
    return {"spatial_std": spatial, "entropy": entropy, "correlation_with_previous": correlation}


def _module_maps(
    model: nn.Module, name: str, values: dict[str, torch.Tensor], input_size: tuple[int, int]
) -> GlobalContextMaps:
    sim, sim_norm, rescaled = (values[k][0].float() for k in KEYS[:3])
    heads, h, w = sim.shape
    gc = model.get_submodule(name)
    distribution = torch.softmax(rescaled.reshape(heads, -1).double(), dim=-1).reshape(heads, h, w).float()
    head_metrics = {"spatial_std": rescaled.reshape(heads, -1).std(dim=-1), **row_metrics(distribution)}
    block, _, module = name.partition(GC_MARKER)
    return GlobalContextMaps(
        name=name,
        block=block,
        module="gc" + module,
        grid=(h, w),
        stride=(input_size[0] / h, input_size[1] / w),
        similarity=sim,
        similarity_norm=sim_norm,
        similarity_rescaled=rescaled,
        distribution=distribution,
        context=values["context"][0].float().norm(dim=0),
        rescale_weight=gc.rescale_weight.detach().float().clone(),
        rescale_bias=gc.rescale_bias.detach().float().clone(),
        head_metrics=head_metrics,
        head_independence=head_cosine(distribution),
    )


@torch.inference_mode()
def analyse_fcvit(model: nn.Module, x: torch.Tensor) -> FCViTAnalysis:
    """Capture every GlobalContext module of an FCViT for one image (1, 3, H, W) and measure it."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, 3, H, W), got {tuple(x.shape)}")
    output, maps = capture_maps(model, x, select=lambda n: GC_MARKER in n)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in maps.items():
        name, _, kind = key.rpartition(".")
        if kind in KEYS:  # a repeated call would be "kind#1": not part of one forward
            grouped.setdefault(name, {})[kind] = value
    complete = {name: values for name, values in grouped.items() if all(k in values for k in KEYS)}
    if not complete:
        raise ValueError(f"{type(model).__name__} recorded no GlobalContext maps (is it an FCViT?)")
    input_size = (int(x.shape[-2]), int(x.shape[-1]))
    modules = [_module_maps(model, name, values, input_size) for name, values in complete.items()]
    last = modules[-1]
    # The ViT metrics, unchanged, on the last module's matrix of identical rows (P is small there).
    measured = metrics.layer_metrics(shared_rows(last.distribution), 0, last.grid, last.stride)
    return FCViTAnalysis(
        logits=output[0].float(),
        input_size=input_size,
        modules=modules,
        depth=depth_trends(modules),
        last={name: measured[name].float() for name in COMPARED},
    )


# --- next to ViT attention -----------------------------------------------------------------------


def vit_key_map(vit: AttentionAnalysis, layer: int = -1) -> torch.Tensor:
    """(h, w) ViT map averaged over heads and query patches: the one map a query-independent model
    would use in its place (each renormalised patch row sums to 1, so the mean does too)."""
    attn = vit.layers[vit.layer_names[layer]]
    rows = metrics.patch_block(attn, vit.num_prefix_tokens)  # (heads, P, P)
    return rows.mean(dim=(0, 1)).reshape(vit.grid)


def compare_with_vit(fc: FCViTAnalysis, vit: AttentionAnalysis) -> dict[str, Any]:
    """FCViT's last GlobalContext module next to the ViT's last layer, the same metrics on both.

    ``map_correlation`` is the Pearson correlation of the FCViT head-mean softmax(S'') map with the
    ViT's head- and query-mean attention map, on the coarser of the two grids.
    """
    fc_map = fc.modules[-1].distribution.mean(0)
    vit_map = vit_key_map(vit)
    last_vit = vit.layer_metrics[-1]
    return {
        "fcvit": {
            "module": fc.modules[-1].name,
            "grid": list(fc.modules[-1].grid),
            **{name: float(fc.last[name].mean()) for name in COMPARED},
            "per_head": {name: fc.last[name].tolist() for name in COMPARED},
        },
        "vit": {
            "layer": vit.layer_names[-1],
            "grid": list(vit.grid),
            **{name: float(last_vit[name].mean()) for name in COMPARED},
            "per_head": {name: last_vit[name].tolist() for name in COMPARED},
        },
        "map_correlation": _json_float(pearson(*to_common_grid(fc_map, vit_map))),
    }


def comparison_sentence(comparison: dict[str, Any], fc_label: str, vit_label: str) -> str:
    """What the numbers on screen say about the claim, in one or two sentences."""
    fc, vit = comparison["fcvit"], comparison["vit"]
    correlation = comparison["map_correlation"]
    where = ("" if correlation is None else
             f" The correlation of the two maps (same grid, 1 = the same places stand out) is {correlation:.2f}.")
    return (
        f"On this image the last layer of {vit_label} has a query-independence of "
        f"{vit['query_independence']:.2f} (1 would mean one shared map, as FCViT assumes) with normalised "
        f"entropy {vit['entropy']:.2f}; {fc_label}'s last global context is shared by construction "
        f"(query-independence {fc['query_independence']:.2f}) with entropy {fc['entropy']:.2f} and "
        f"top-5% mass {fc['topk_mass']:.2f} (ViT {vit['topk_mass']:.2f}).{where}"
    )


def depth_sentence(fc: FCViTAnalysis) -> str:
    """How the similarity maps change from the first to the last GlobalContext module."""
    spatial, correlation = fc.depth["spatial_std"], fc.depth["correlation_with_previous"]
    finite = [c for c in correlation if not math.isnan(c)]
    mean_corr = sum(finite) / len(finite) if finite else float("nan")
    return (
        f"The spatial spread (std over positions) of S″ goes from {spatial[0]:.2f} in the first module to "
        f"{spatial[-1]:.2f} in the last; consecutive modules' maps correlate by {mean_corr:.2f} on average, "
        f"so {'each module largely keeps' if mean_corr > 0.5 else 'the modules do not simply repeat'} "
        "the previous module's map."
    )


def depth_figure(fc: FCViTAnalysis) -> go.Figure:
    """Spatial std, entropy of softmax(S'') and correlation with the previous module, x = module."""
    labels = fc.module_labels()
    xs = list(range(1, len(labels) + 1))
    panels = (("spatial_std", "spatial std of S″ (head mean)"),
              ("entropy", "entropy of softmax(S″) (head mean)"),
              ("correlation_with_previous", "correlation with previous module"))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[title for _, title in panels], horizontal_spacing=0.07)
    for col, (key, title) in enumerate(panels, start=1):
        ys = [None if math.isnan(v) else v for v in fc.depth[key]]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=title, text=labels, showlegend=False,
                                 hovertemplate="%{text}<br>%{y:.3f}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="GlobalContext module (execution order)", dtick=2, row=1, col=col)
    fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig

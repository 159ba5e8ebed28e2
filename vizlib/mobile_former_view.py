"""Mobile-Former's two bridges, block by block: what the Mobile-Former page and CLI show.

One forward pass records, for every block with bridges (``models.mobile_former`` capture points):

* Mobile->Former (``local_global.attn``, (heads, T, H, W)): each global token's softmax over the
  pixels of the block input: where the token reads from;
* Mobile<-Former (``global_local.attn``, (heads, H, W, T)): each pixel's softmax over the T tokens:
  which token writes into it;
* the tokens the block hands on ((T, Ct)).

Everything else (assignment maps, centroids, entropies, token similarities) is cheap arithmetic on
those small tensors, so a new block, head or token is a lookup and never a new forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from torch import nn

from models.capture import capturing
from vizlib import overlay

L2G_KEY = ".local_global.attn"
G2L_KEY = ".global_local.attn"
TOKENS_KEY = ".tokens"
EPS = 1e-12
# Qualitative colours for the argmax token map (one per token; tokens beyond 10 wrap around).
TOKEN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


@dataclass
class BridgeBlock:
    """The two bridges and the tokens of one block (batch dimension dropped)."""

    name: str  # module path, e.g. "features.3"
    l2g: torch.Tensor  # (heads, T, H, W) Mobile->Former, each (head, token) sums to 1 over H, W
    g2l: torch.Tensor  # (heads, H', W', T) Mobile<-Former, each (head, pixel) sums to 1 over T
    tokens: torch.Tensor  # (T, Ct) the tokens after this block's Former

    @property
    def l2g_grid(self) -> tuple[int, int]:
        return int(self.l2g.shape[-2]), int(self.l2g.shape[-1])

    @property
    def g2l_grid(self) -> tuple[int, int]:
        return int(self.g2l.shape[1]), int(self.g2l.shape[2])


def _select_head(maps: torch.Tensor, head: int | None) -> torch.Tensor:
    """Head ``head`` of a (heads, ...) stack, or the mean of heads (still a distribution)."""
    return maps.mean(0) if head is None else maps[head]


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """(K, D) -> (K, K) cosine similarity of every pair of rows."""
    unit = F.normalize(vectors.double(), dim=-1, eps=EPS)
    return (unit @ unit.T).float()


def map_centroid(maps: torch.Tensor) -> torch.Tensor:
    """(..., H, W) distributions -> (..., 2) centre of mass (row, col) as fractions of the image in [0, 1]."""
    height, width = maps.shape[-2:]
    rows = (torch.arange(height, dtype=torch.float64) + 0.5) / height  # pixel centres
    cols = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    p = maps.double()
    p = p / p.sum((-2, -1), keepdim=True).clamp_min(EPS)
    return torch.stack([(p.sum(-1) * rows).sum(-1), (p.sum(-2) * cols).sum(-1)], dim=-1).float()


def map_entropy(maps: torch.Tensor) -> torch.Tensor:
    """(..., H, W) distributions -> (...) entropy / log(H W): 1 = uniform over pixels, 0 = one pixel."""
    p = maps.double().flatten(-2)
    p = p / p.sum(-1, keepdim=True).clamp_min(EPS)
    entropy = -(p * torch.log(p.clamp_min(EPS))).sum(-1)
    return (entropy / math.log(max(p.shape[-1], 2))).float()


def mean_offdiagonal(matrix: torch.Tensor) -> float:
    """Mean of a square matrix without its diagonal (1.0 for a 1x1 matrix: nothing to compare)."""
    k = matrix.shape[-1]
    if k < 2:
        return 1.0
    mask = ~torch.eye(k, dtype=torch.bool)
    return float(matrix[mask].mean())


@dataclass
class MobileFormerAnalysis:
    """Both bridges of every block for one image, plus how tokens and their regions evolve."""

    logits: torch.Tensor  # (classes,)
    blocks: list[BridgeBlock]
    initial_tokens: torch.Tensor  # (T, Ct) the learned tokens before the first block
    image_size: tuple[int, int]  # (H, W) of the model input
    token_similarity: torch.Tensor = field(init=False)  # (blocks, T, T) cosine between tokens
    token_drift: torch.Tensor = field(init=False)  # (blocks, T) cosine of each token to itself one block earlier

    def __post_init__(self) -> None:
        self.token_similarity = torch.stack([cosine_matrix(b.tokens) for b in self.blocks])
        previous = [self.initial_tokens] + [b.tokens for b in self.blocks[:-1]]
        self.token_drift = torch.stack([
            F.cosine_similarity(b.tokens.double(), p.double(), dim=-1, eps=EPS).float()
            for b, p in zip(self.blocks, previous, strict=True)
        ])

    @property
    def num_tokens(self) -> int:
        return int(self.initial_tokens.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.blocks[0].l2g.shape[0])

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    # -- Mobile->Former ---------------------------------------------------------------------------

    def token_maps(self, block: int, head: int | None = None) -> torch.Tensor:
        """(T, H, W): where each token reads from in ``block`` (one head, or the mean of heads)."""
        return _select_head(self.blocks[block].l2g, head)

    def centroids(self, head: int | None = None) -> torch.Tensor:
        """(blocks, T, 2): each token's Mobile->Former centre of mass (row, col), fractions of the image."""
        return torch.stack([map_centroid(self.token_maps(i, head)) for i in range(len(self.blocks))])

    def entropy(self, head: int | None = None) -> torch.Tensor:
        """(blocks, T): normalised entropy of each token's Mobile->Former map (1 = reads everywhere)."""
        return torch.stack([map_entropy(self.token_maps(i, head)) for i in range(len(self.blocks))])

    def map_overlap(self, head: int | None = None) -> torch.Tensor:
        """(blocks,): mean cosine between the Mobile->Former maps of different tokens (1 = all read alike)."""
        return torch.tensor([mean_offdiagonal(cosine_matrix(self.token_maps(i, head).flatten(1)))
                             for i in range(len(self.blocks))])

    # -- Mobile<-Former ---------------------------------------------------------------------------

    def soft_assignment(self, block: int, head: int | None = None) -> torch.Tensor:
        """(T, H', W'): how much each pixel takes from each token (sums to 1 over T at every pixel)."""
        return _select_head(self.blocks[block].g2l, head).permute(2, 0, 1)

    def assignment(self, block: int, head: int | None = None) -> torch.Tensor:
        """(H', W') int64: the token each pixel takes most from."""
        return self.soft_assignment(block, head).argmax(0)

    def pixel_shares(self, block: int, head: int | None = None) -> torch.Tensor:
        """(T,): fraction of the pixels whose strongest token is each token."""
        counts = torch.bincount(self.assignment(block, head).flatten(), minlength=self.num_tokens)
        return counts.float() / counts.sum()

    # -- tokens across blocks ---------------------------------------------------------------------

    def cross_block_similarity(self, token: int) -> torch.Tensor:
        """(blocks + 1, blocks + 1): cosine of one token at every pair of depths (initial first)."""
        stack = torch.stack([self.initial_tokens[token]] + [b.tokens[token] for b in self.blocks])
        return cosine_matrix(stack)

    def summary(self, head: int | None = None) -> list[dict[str, object]]:
        """Per block, the numbers the page and the CLI show (head mean unless ``head`` is given)."""
        centroids, entropy, overlap = self.centroids(head), self.entropy(head), self.map_overlap(head)
        rows: list[dict[str, object]] = []
        for i, block in enumerate(self.blocks):
            shares = self.pixel_shares(i, head)
            rows.append({
                "name": block.name,
                "l2g_grid": list(block.l2g_grid),
                "g2l_grid": list(block.g2l_grid),
                "tokens": [
                    {"token": t, "centroid": [round(float(v), 6) for v in centroids[i, t]],
                     "entropy": float(entropy[i, t]), "pixel_share": float(shares[t]),
                     "drift": float(self.token_drift[i, t])}
                    for t in range(self.num_tokens)
                ],
                "map_overlap": float(overlap[i]),
                "mean_token_similarity": mean_offdiagonal(self.token_similarity[i]),
                "token_similarity": self.token_similarity[i].tolist(),
                "assignment": self.assignment(i, head).tolist(),
            })
        return rows


def is_mobile_former(model: nn.Module) -> bool:
    return hasattr(model, "features") and hasattr(model, "initial_tokens")


@torch.inference_mode()
def analyse_mobile_former(model: nn.Module, x: torch.Tensor) -> MobileFormerAnalysis:
    """Run one image (1, 3, H, W) through a Mobile-Former and keep both bridges of every block."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, 3, H, W), got {tuple(x.shape)}")
    if not is_mobile_former(model):
        raise TypeError(f"{type(model).__name__} is not a Mobile-Former")

    def wanted(name: str) -> bool:
        # Only the blocks' bridges: the classifier's own Mobile->Former has no Mobile<-Former partner.
        return name.startswith("features.") and name.endswith((L2G_KEY, G2L_KEY, TOKENS_KEY))

    with capturing(wanted) as maps:
        logits = model(x)
    blocks = []
    for key, l2g in maps.items():
        if not key.endswith(L2G_KEY):
            continue
        name = key[: -len(L2G_KEY)]
        blocks.append(BridgeBlock(name, l2g[0].float(), maps[name + G2L_KEY][0].float(),
                                  maps[name + TOKENS_KEY][0].float()))
    if not blocks:
        raise ValueError(f"{type(model).__name__} recorded no Mobile-Former bridges")
    return MobileFormerAnalysis(
        logits=logits[0].float(),
        blocks=blocks,
        initial_tokens=model.initial_tokens(1)[0].detach().float().clone(),
        image_size=(int(x.shape[-2]), int(x.shape[-1])),
    )


# --- figures (no Streamlit) ------------------------------------------------------------------------


def token_colour(token: int) -> str:
    return TOKEN_COLOURS[token % len(TOKEN_COLOURS)]


def assignment_image(crop: np.ndarray, assignment: torch.Tensor, alpha: float = 0.55) -> np.ndarray:
    """The crop with each pixel tinted in the colour of its strongest token (OpenCV, for PNG)."""
    labels = assignment.cpu().numpy()
    palette = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in TOKEN_COLOURS], dtype=np.uint8)
    base = overlay.upscale(np.ascontiguousarray(crop, dtype=np.uint8), overlay.display_scale(crop.shape))
    index = overlay.upsample_map(labels.astype(np.float64), base.shape[:2]).astype(np.int64)
    tinted = overlay.blend(base, palette[index % len(palette)], alpha)
    # Grid lines only where cells are large enough to see; a 32x32 grid would hide the picture.
    return overlay.draw_grid(tinted, labels.shape) if max(labels.shape) <= 16 else tinted


def assignment_figure(assignment: torch.Tensor, num_tokens: int, title: str = "") -> go.Figure:
    """The argmax token map as a categorical heatmap, one legend colour per token."""
    labels = assignment.cpu().numpy()
    colours = [token_colour(t) for t in range(num_tokens)]
    # A stepped colour scale makes each integer token a flat colour.
    scale = []
    for t, colour in enumerate(colours):
        scale += [[t / num_tokens, colour], [(t + 1) / num_tokens, colour]]
    fig = go.Figure(go.Heatmap(
        z=labels, zmin=-0.5, zmax=num_tokens - 0.5, colorscale=scale,
        colorbar={"title": {"text": "token"}, "tickvals": list(range(num_tokens)), "thickness": 12},
        hovertemplate="row %{y}, col %{x}<br>token %{z}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", visible=False)
    fig.update_xaxes(visible=False)
    fig.update_layout(title=title or None, height=380, margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10})
    return fig


def trajectory_figure(analysis: MobileFormerAnalysis, head: int | None = None,
                      highlight: int | None = None) -> go.Figure:
    """Each token's Mobile->Former centre of mass through the blocks, on the image plane."""
    centroids = analysis.centroids(head).numpy()
    height, width = analysis.image_size
    fig = go.Figure()
    for t in range(analysis.num_tokens):
        ys, xs = centroids[:, t, 0] * height, centroids[:, t, 1] * width
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers+text", name=f"token {t}",
            text=[str(i + 1) for i in range(len(xs))], textposition="top center",
            line={"color": token_colour(t), "width": 4 if t == highlight else 1.5},
            hovertemplate="block %{text}<br>x %{x:.1f}, y %{y:.1f}<extra>token " + str(t) + "</extra>",
        ))
    fig.update_xaxes(range=[0, width], title="x (px)")
    fig.update_yaxes(range=[height, 0], title="y (px)", scaleanchor="x")
    fig.update_layout(height=420, margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig


def per_block_figure(values: np.ndarray, y_title: str, names: list[str],
                     highlight: int | None = None) -> go.Figure:
    """(blocks, T) values as one line per token over block depth."""
    fig = go.Figure()
    blocks = list(range(1, values.shape[0] + 1))
    for t in range(values.shape[1]):
        fig.add_trace(go.Scatter(
            x=blocks, y=values[:, t], mode="lines+markers", name=f"token {t}",
            line={"color": token_colour(t), "width": 4 if t == highlight else 1.5},
            customdata=names, hovertemplate="%{customdata}: %{y:.3f}<extra>token " + str(t) + "</extra>",
        ))
    fig.update_xaxes(title="block", tickvals=blocks)
    fig.update_yaxes(title=y_title)
    fig.update_layout(height=340, margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig


def matrix_figure(matrix: torch.Tensor, labels: list[str], title: str = "") -> go.Figure:
    """A square cosine-similarity matrix with its values written in the cells."""
    values = matrix.cpu().numpy()
    fig = go.Figure(go.Heatmap(
        z=values, x=labels, y=labels, zmin=-1.0, zmax=1.0, colorscale="RdBu", reversescale=True,
        text=np.round(values, 2), texttemplate="%{text}", colorbar={"title": {"text": "cosine"}, "thickness": 12},
        hovertemplate="%{y} · %{x}: %{z:.3f}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    fig.update_layout(title=title or None, height=400, margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10})
    return fig

"""MOAT with the same weights run twice, global and windowed: what the MOAT page and CLI show.

Both runs use :func:`models.moat.attention_mode`, a per-call ``ContextVar`` override, so the shared
cached model is never switched (two sessions may look at two modes at once). Shown:

* the attention row of a query token in both modes, per MOAT block and head;
* how far the windowed run drifts from the global one (relative feature difference per block,
  per stage, for the pooled features);
* the receptive field of the query in window mode: gradient of the norm of its output feature at a
  MOAT block w.r.t. (a) the block's attention input, (b) the block's input and (c) the image, and
  the share of that gradient mass lying OUTSIDE the query's window. Attention alone keeps (a) at
  exactly 0; whatever lies outside in (b) crossed the window border through the block's MBConv
  (its 3x3 depthwise convolution), and (c) adds every earlier layer.

The query is a cell of the *reference grid*, the first MOAT block's output grid; coarser blocks use
the cell under the same spot (:func:`vizlib.overlay.relative_patch`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.capture import capturing
from models.moat import AttentionMode, Moat, attention_mode, avg_pool_same
from vizlib import overlay

WindowSpec = int | tuple[int, int] | None  # None: each MOAT stage's default window
MODES = ("global", "window")
ATTN_KEY = ".attention.attn"
EPS = 1e-12
IMAGE_MAP_SIDE = 64  # image-gradient maps are stored pooled to at most this many cells per side
WINDOW_COLOUR = (0, 255, 0)  # green: distinct from the white patch grid and the cyan query


def window_spec(window: WindowSpec) -> Any:
    """The :func:`models.moat.attention_mode` spec for a window choice (the same for every MOAT stage)."""
    if window is None:
        return "window"
    if isinstance(window, int):
        return AttentionMode("window", (window, window))
    return AttentionMode("window", (int(window[0]), int(window[1])))


def window_label(window: WindowSpec) -> str:
    if window is None:
        return "stage defaults"
    if isinstance(window, int):
        return f"{window}×{window}"
    return f"{window[0]}×{window[1]}"


def _stage_plan(s: int, stage: nn.Module) -> list[tuple[str, nn.Module, AttentionMode | None]]:
    """(name, block, mode) of a stage's blocks, the mode resolved in the calling context (None: MBConv).

    Mirrors ``MoatStage.forward`` (the last block of a stage is global with ``global_last``).
    """
    mode = stage.current_mode() if stage.has_attention else None
    last = len(stage) - 1
    return [(f"stages.{s}.{b}", block,
             AttentionMode("global") if (mode is not None and stage.global_last and b == last) else mode)
            for b, block in enumerate(stage)]


def effective_window(grid: tuple[int, int], mode: AttentionMode | None) -> tuple[int, int]:
    """The window a mode really uses on a map (clipped to it, as ``MoatAttention`` does)."""
    if mode is None or mode.mode == "global":
        return grid
    return min(mode.window[0], grid[0]), min(mode.window[1], grid[1])


def window_bounds(query: tuple[int, int], grid: tuple[int, int],
                  window: tuple[int, int]) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1), end exclusive: the cells of the window holding ``query`` (ragged at the edges)."""
    r0 = (query[0] // window[0]) * window[0]
    c0 = (query[1] // window[1]) * window[1]
    return r0, min(r0 + window[0], grid[0]), c0, min(c0 + window[1], grid[1])


def same_window_mask(grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """(N, N) bool, N = H*W row-major: True where query and key share a window."""
    rows = torch.arange(grid[0]).repeat_interleave(grid[1])
    cols = torch.arange(grid[1]).repeat(grid[0])
    return ((rows // window[0])[:, None] == (rows // window[0])[None, :]) & (
        (cols // window[1])[:, None] == (cols // window[1])[None, :])


def region_on(bounds: tuple[int, int, int, int], grid: tuple[int, int],
              size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Window cells ``bounds`` of ``grid`` as (y0, y1, x0, x1) on a map of ``size`` covering the same image."""
    r0, r1, c0, c1 = bounds
    x0, y0, _, _ = overlay.patch_box(grid, size, r0, c0)
    _, _, x1, y1 = overlay.patch_box(grid, size, r1 - 1, c1 - 1)
    return y0, y1, x0, x1


def outside_share(mass: torch.Tensor, region: tuple[int, int, int, int]) -> float:
    """Share of a non-negative (H, W) map's total lying outside ``region`` (y0, y1, x0, x1)."""
    y0, y1, x0, x1 = region
    total = float(mass.double().sum())
    if total <= 0:
        return 0.0
    inside = float(mass[y0:y1, x0:x1].double().sum())
    return max(0.0, (total - inside) / total)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: how far ``a`` (window) is from ``b`` (global)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(EPS))


# --- one pass in one mode --------------------------------------------------------------------------


@dataclass
class ModePass:
    """One forward pass in one attention mode (batch dimension dropped)."""

    logits: torch.Tensor  # (classes,)
    pooled: torch.Tensor  # (C,) the head's pre-logit features
    stage_outputs: list[torch.Tensor]  # (C, H, W) per stage
    block_outputs: OrderedDict[str, torch.Tensor]  # MOAT block name -> (C, H, W)
    modes: OrderedDict[str, AttentionMode]  # MOAT block name -> the mode it ran in
    attn: OrderedDict[str, torch.Tensor]  # MOAT block name -> (heads, N, N)


def mode_pass(model: Moat, x: torch.Tensor, spec: Any) -> ModePass:
    """Run ``model`` on ``x`` with MOAT attention ``spec`` for this call only, keeping every map."""

    def wanted(name: str) -> bool:
        return name.endswith(ATTN_KEY)

    stage_outputs: list[torch.Tensor] = []
    block_outputs: OrderedDict[str, torch.Tensor] = OrderedDict()
    modes: OrderedDict[str, AttentionMode] = OrderedDict()
    with torch.inference_mode(), attention_mode(model, spec), capturing(wanted) as maps:
        h = model.stem(x)
        for s, stage in enumerate(model.stages):
            for name, block, mode in _stage_plan(s, stage):
                h = block(h) if mode is None else block(h, mode)
                if mode is not None:
                    block_outputs[name], modes[name] = h[0].float(), mode
            stage_outputs.append(h[0].float())
        pooled = model.forward_head(h, pre_logits=True)[0].float()
        logits = model.forward_head(h)[0].float()
    attn = OrderedDict((key[: -len(ATTN_KEY)], value[0].float()) for key, value in maps.items())
    return ModePass(logits, pooled, stage_outputs, block_outputs, modes, attn)


# --- the analysis ----------------------------------------------------------------------------------


@dataclass
class MoatBlockView:
    """One MOAT block in both modes."""

    name: str
    grid: tuple[int, int]  # (H, W) tokens
    window: tuple[int, int]  # the window-mode window on this map (clipped)
    attn_global: torch.Tensor  # (heads, N, N)
    attn_window: torch.Tensor  # (heads, N, N), exact zeros across windows
    feature_difference: float  # ||y_window - y_global|| / ||y_global|| of the block output

    @property
    def num_heads(self) -> int:
        return int(self.attn_global.shape[0])

    @property
    def window_is_global(self) -> bool:
        return tuple(self.window) == tuple(self.grid)

    def cross_window_mass(self) -> float:
        """The largest attention mass any window-mode query puts outside its window (0 by design)."""
        outside = ~same_window_mask(self.grid, self.window)
        return float((self.attn_window * outside).sum(-1).max())


@dataclass
class BlockField:
    """Receptive field of the query's output feature at one MOAT block, in one mode.

    Maps are gradient mass (|grad| summed over channels); ``outside`` is the share of each map's mass
    outside the query's window-mode window.
    """

    attention_input: torch.Tensor  # (H, W) on the block's grid
    block_input: torch.Tensor  # (Hin, Win) on the block input's grid
    image: torch.Tensor  # (h, w) image pixels, pooled to at most IMAGE_MAP_SIDE per side
    outside: dict[str, float]  # "attention_input", "block_input", "image" -> share in [0, 1]


@dataclass
class BlockReceptiveField:
    name: str
    query: tuple[int, int]  # on this block's grid
    bounds: tuple[int, int, int, int]  # (r0, r1, c0, c1) of the query's window on this grid
    modes: dict[str, BlockField]  # "window" and "global"


@dataclass
class ReceptiveField:
    """Receptive fields of one query (reference-grid cell) at every MOAT block, both modes."""

    query: tuple[int, int]
    reference_grid: tuple[int, int]
    blocks: list[BlockReceptiveField]

    def table(self) -> list[dict[str, object]]:
        """One row per block: outside-window shares in window mode (and global for comparison)."""
        rows: list[dict[str, object]] = []
        for block in self.blocks:
            row: dict[str, object] = {"block": block.name, "query": f"({block.query[0]}, {block.query[1]})"}
            for mode in ("window", "global"):
                for source, share in block.modes[mode].outside.items():
                    row[f"{mode}: {source.replace('_', ' ')}"] = share
            rows.append(row)
        return rows


@dataclass
class MoatAnalysis:
    """Global vs window for one image: attention, feature differences (and optionally one receptive field)."""

    window: WindowSpec
    logits_global: torch.Tensor
    logits_window: torch.Tensor
    blocks: list[MoatBlockView]
    stage_difference: list[float]  # per stage, ||window - global|| / ||global|| (0 before the first MOAT stage)
    final_difference: float  # pooled pre-logit features
    image_size: tuple[int, int]
    receptive: ReceptiveField | None = field(default=None)

    @property
    def window_text(self) -> str:
        return window_label(self.window)

    @property
    def reference_grid(self) -> tuple[int, int]:
        return self.blocks[0].grid

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def all_windows_global(self) -> bool:
        return all(b.window_is_global for b in self.blocks)

    def block_query(self, block: int, query: tuple[int, int]) -> tuple[int, int]:
        """The cell of ``block``'s grid under reference-grid cell ``query``."""
        return overlay.relative_patch(query, self.reference_grid, self.blocks[block].grid)

    def query_map(self, block: int, query: tuple[int, int], head: int | None, mode: str) -> torch.Tensor:
        """(H, W): the attention row of ``query`` (a cell of this block's grid); ``head=None`` = mean."""
        view = self.blocks[block]
        attn = view.attn_window if mode == "window" else view.attn_global
        row = attn[:, query[0] * view.grid[1] + query[1]].reshape(view.num_heads, *view.grid)
        return row.mean(0) if head is None else row[head]


def analyse_moat(model: nn.Module, x: torch.Tensor, window: WindowSpec = None,
                 query: tuple[int, int] | None = None) -> MoatAnalysis:
    """Run one image through the same MOAT weights globally and in windows of ``window``.

    ``window``: an int or (h, w) for every MOAT stage, None for each stage's default window.
    With ``query`` (a cell of the reference grid) the receptive field is computed too; the page
    computes it separately (:func:`receptive_field`) so another query reuses this analysis.
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, 3, H, W), got {tuple(x.shape)}")
    if not isinstance(model, Moat):
        raise TypeError(f"{type(model).__name__} is not a MOAT model")
    if not model.moat_stages:
        raise ValueError("this MOAT has no attention stage")
    passes = {"global": mode_pass(model, x, "global"), "window": mode_pass(model, x, window_spec(window))}
    glob, win = passes["global"], passes["window"]
    blocks = []
    for name, output in win.block_outputs.items():
        grid = (int(output.shape[-2]), int(output.shape[-1]))
        blocks.append(MoatBlockView(
            name=name, grid=grid, window=effective_window(grid, win.modes[name]),
            attn_global=glob.attn[name], attn_window=win.attn[name],
            feature_difference=relative_difference(output, glob.block_outputs[name]),
        ))
    analysis = MoatAnalysis(
        window=window,
        logits_global=glob.logits,
        logits_window=win.logits,
        blocks=blocks,
        stage_difference=[relative_difference(w, g) for w, g in zip(win.stage_outputs, glob.stage_outputs,
                                                                     strict=True)],
        final_difference=relative_difference(win.pooled, glob.pooled),
        image_size=(int(x.shape[-2]), int(x.shape[-1])),
    )
    if query is not None:
        analysis.receptive = receptive_field(model, x, window, query)
    return analysis


# --- receptive field -------------------------------------------------------------------------------


@dataclass
class _Trace:
    name: str
    block_input: torch.Tensor  # (1, C, Hin, Win)
    attention_input: torch.Tensor  # (1, C, H, W): the MBConv output, what LN + attention read
    output: torch.Tensor  # (1, C, H, W)
    mode: AttentionMode


def _moat_block(block: nn.Module, u: torch.Tensor, mode: AttentionMode) -> tuple[torch.Tensor, torch.Tensor]:
    """``MoatBlock.forward`` split at the attention input: returns (MBConv output, block output).

    Written out because autograd needs the intermediate tensor; tests check it equals ``block(u, mode)``.
    """
    shortcut = u
    if block.stride > 1:
        shortcut = avg_pool_same(shortcut, block.pool_size, block.stride)
    if block.shortcut_conv is not None:
        shortcut = block.shortcut_conv(shortcut)
    z = F.gelu(block.expand_norm(block.expand_conv(block.pre_norm(u))))
    z = F.gelu(block.depthwise_norm(block.depthwise_conv(z)))
    if block.se is not None:
        z = block.se(z)
    a = shortcut + block.drop_path(block.shrink_conv(z))
    y = block.attention(block.attention_norm(a.permute(0, 2, 3, 1)), mode).permute(0, 3, 1, 2)
    return a, a + block.drop_path(y)


def _traced_pass(model: Moat, x: torch.Tensor, spec: Any) -> list[_Trace]:
    """A differentiable forward (up to the last MOAT block) keeping each MOAT block's tensors."""
    traces: list[_Trace] = []
    with attention_mode(model, spec):
        h = model.stem(x)
        for s, stage in enumerate(model.stages):
            for name, block, mode in _stage_plan(s, stage):
                if mode is None:
                    h = block(h)
                    continue
                a, out = _moat_block(block, h, mode)
                traces.append(_Trace(name, h, a, out, mode))
                h = out
            if s >= model.moat_stages[-1]:
                break  # nothing after the last MOAT stage is needed for the gradients
    return traces


def _mass(grad: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) gradient -> (H, W) mass: |grad| summed over channels."""
    return grad[0].abs().sum(0).detach().float()


def _pooled_image_map(mass: torch.Tensor) -> torch.Tensor:
    """Keep small image maps as they are; average-pool large ones to at most IMAGE_MAP_SIDE per side."""
    height, width = mass.shape
    factor = -(-max(height, width) // IMAGE_MAP_SIDE)
    if factor <= 1:
        return mass
    size = (-(-height // factor), -(-width // factor))
    return F.adaptive_avg_pool2d(mass[None, None], size)[0, 0]


def receptive_field(model: nn.Module, x: torch.Tensor, window: WindowSpec = None,
                    query: tuple[int, int] | None = None) -> ReceptiveField:
    """Gradient of ||y_b[query]|| at every MOAT block b w.r.t. its attention input, its input and the
    image, in window mode and (for comparison) global mode; shares outside the query's window.

    ``query`` is a cell of the reference grid (the first MOAT block's grid; default its centre).
    Gradients are taken w.r.t. inputs only (``torch.autograd.grad``), so the shared model's
    parameters and their ``.grad`` are never touched.
    """
    if not isinstance(model, Moat):
        raise TypeError(f"{type(model).__name__} is not a MOAT model")
    image = x.detach().clone().requires_grad_(True)
    fields: dict[str, list[_Trace]] = {}
    with torch.enable_grad():
        for mode_name, spec in (("window", window_spec(window)), ("global", "global")):
            fields[mode_name] = _traced_pass(model, image, spec)
        reference = tuple(int(s) for s in fields["window"][0].output.shape[-2:])
        query = query if query is not None else (reference[0] // 2, reference[1] // 2)
        if not (0 <= query[0] < reference[0] and 0 <= query[1] < reference[1]):
            raise ValueError(f"query {query} is outside the {reference[0]}x{reference[1]} grid")
        blocks = []
        for index, win_trace in enumerate(fields["window"]):
            grid = (int(win_trace.output.shape[-2]), int(win_trace.output.shape[-1]))
            cell = overlay.relative_patch(query, reference, grid)
            bounds = window_bounds(cell, grid, effective_window(grid, win_trace.mode))
            per_mode = {}
            for mode_name in ("window", "global"):
                trace = fields[mode_name][index]
                score = trace.output[0, :, cell[0], cell[1]].norm()
                g_image, g_input, g_attn = torch.autograd.grad(
                    score, [image, trace.block_input, trace.attention_input], retain_graph=True)
                maps = {"attention_input": _mass(g_attn), "block_input": _mass(g_input), "image": _mass(g_image)}
                outside = {
                    key: outside_share(value, region_on(bounds, grid, tuple(value.shape)))
                    for key, value in maps.items()
                }
                per_mode[mode_name] = BlockField(maps["attention_input"], maps["block_input"],
                                                 _pooled_image_map(maps["image"]), outside)
            blocks.append(BlockReceptiveField(win_trace.name, cell, bounds, per_mode))
    return ReceptiveField((int(query[0]), int(query[1])), reference, blocks)


# --- rendering (no Streamlit) ----------------------------------------------------------------------


def draw_windows(image: np.ndarray, grid: tuple[int, int], window: tuple[int, int],
                 bounds: tuple[int, int, int, int] | None = None,
                 colour: tuple[int, int, int] = WINDOW_COLOUR) -> np.ndarray:
    """Window borders over a rendered map (every ``window`` cells of ``grid``); the query's window thicker."""
    out = image.copy()
    size = image.shape[:2]
    for r in range(window[0], grid[0], window[0]):
        y = overlay.patch_box(grid, size, r, 0)[1]
        cv2.line(out, (0, y), (size[1] - 1, y), colour, 1)
    for c in range(window[1], grid[1], window[1]):
        x = overlay.patch_box(grid, size, 0, c)[0]
        cv2.line(out, (x, 0), (x, size[0] - 1), colour, 1)
    if bounds is not None:
        y0, y1, x0, x1 = region_on(bounds, grid, size)
        thickness = max(2, min(size) // 128)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, thickness)
    return out

"""MOAT: alternating mobile convolution and attention (Yang et al., ICLR 2023, arXiv 2210.01820).

A PyTorch port of the official TF2 code (google-research/deeplab2, ``model/pixel_encoder/moat.py``,
``model/layers/moat_blocks.py``, ``model/layers/moat_attention.py``), written from its facts:

* stem: conv3x3 s2 (bias) -> BN -> GELU -> conv3x3 (bias), no norm after the second conv;
* stages MBConv, MBConv, MOAT, MOAT; the first block of each has stride 2;
* MBConv: BN -> 1x1 expand x4 (no bias) -> BN -> GELU -> DW3x3 -> BN -> GELU -> SE -> 1x1 shrink (bias),
  shortcut AvgPool(2, s2, 'same') (+1x1 conv when the width changes);
* MOAT block: the same MBConv without SE, then ``x + Attn(LN(x))`` and no MLP;
* attention: heads = C / 32, separate q/k/v/o dense layers with bias, q scaled by 32^-0.5, softmax in
  fp32, a learned 2-D relative position bias ``E[heads, 2P-1, 2P-1]`` indexed key minus query and
  bilinearly resized to ``2w-1`` for a window (or a global grid) of size ``w != P``;
* head: spatial mean -> LayerNorm -> 1x1 conv.

Porting facts kept on purpose: Keras BatchNorm eps 1e-3; TF 'same' padding (stride-2 convs on even
inputs pad bottom/right only); exact GELU; the ``final_layer_norm`` uses the code's ``ln_epsilon``
(1e-5), not the Keras default. Module names mirror the TF variable scopes (``stem.conv_0``,
``stages.S.B.expand_conv``, ``...attention.q``, ``final_layer_norm``, ``logits_head``) so that
:func:`convert_tf_variables` is a renaming plus the documented layout permutations.

Attention mode. The official class default is windows ``[None, None, [14, 14], [7, 7]]`` while
``get_model`` builds global attention; at 224 both coincide. The 384/512 fine-tuned checkpoints
(24x24 and 32x32 maps at stride 16) can only have run global, so global is our default. The mode of
every MOAT stage can be changed on a loaded model, persistently with :meth:`Moat.set_attention_mode`
or for the calling thread / context only with :func:`attention_mode` (a ``ContextVar``). A window that
does not divide the map (the official code requires it to) gives ragged edge windows here: tokens
attend within ``(row // wh, col // ww)`` blocks, computed with a block mask over the whole map. A
window larger than the map is clipped to it (then window and global attention coincide).

Capture (``models/capture.py``): each attention module records ``attn`` = (B, heads, N, N) over all
N = H*W tokens of the map in row-major order (block-sparse with exact zeros across windows in window
mode) and ``window`` = ``{"mode", "grid", "window"}``. The explicit softmax runs only while someone
captures; otherwise ``F.scaled_dot_product_attention`` does the work.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from models.capture import name_capture_points, record, wants

__all__ = [
    "AttentionMode",
    "Moat",
    "attention_mode",
    "convert_tf_variables",
    "parse_attention_modes",
]

_BN_EPS = 1e-3  # Keras BatchNormalization default (PyTorch's is 1e-5)
_LN_EPS = 1e-5  # the code's ln_epsilon, used by attention_norm and final_layer_norm
_HEAD_DIM = 32
_TF_CKPT_URL = "https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/{}.tar.gz"


# ----------------------------------------------------------------------------------------------
# TF 'same' padding
# ----------------------------------------------------------------------------------------------


def tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TF 'same': the odd pixel goes after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """Conv2d with TF 'same' padding computed from the input size (so any input size works).

    For the stride-2 3x3 convs on even inputs this is pad (0, 1, 0, 1); PyTorch's symmetric
    ``padding=1`` would shift every output by half a pixel against the TF weights.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = tf_same_pad(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = tf_same_pad(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return self._conv_forward(x, self.weight, self.bias)


def avg_pool_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Keras ``AveragePooling2D(padding='same')``: padded cells are left out of each average."""
    top, bottom = tf_same_pad(x.shape[-2], kernel, stride)
    left, right = tf_same_pad(x.shape[-1], kernel, stride)
    if not (top or bottom or left or right):
        return F.avg_pool2d(x, kernel, stride)
    pad = (left, right, top, bottom)
    total = F.avg_pool2d(F.pad(x, pad), kernel, stride, divisor_override=1)
    ones = x.new_ones((1, 1, x.shape[-2], x.shape[-1]))
    count = F.avg_pool2d(F.pad(ones, pad), kernel, stride, divisor_override=1)
    return total / count


# ----------------------------------------------------------------------------------------------
# Attention modes (persistent per model, overridable per context)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionMode:
    """How one MOAT stage attends: ``global`` (whole map) or ``window`` of ``(wh, ww)`` tokens."""

    mode: str = "global"
    window: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("global", "window"):
            raise ValueError(f"attention mode must be 'global' or 'window', got {self.mode!r}")
        if self.mode == "window":
            if self.window is None or len(self.window) != 2 or min(self.window) < 1:
                raise ValueError(f"window mode needs a (height, width) of positive ints, got {self.window!r}")
        elif self.window is not None:
            raise ValueError("global mode takes no window size")


GLOBAL = AttentionMode("global")

# Overrides opened by attention_mode(), innermost last: ("stages", {stage module: mode}) for one model,
# or ("all", spec) for every MOAT model (parsed against each model's layout when it runs).
_MODE_OVERRIDES: ContextVar[tuple[tuple[str, Any], ...]] = ContextVar(
    "moat_attention_mode_overrides", default=()
)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_single_spec(spec: Any) -> bool:
    if spec is None or isinstance(spec, (str, AttentionMode)) or _is_int(spec):
        return True
    return isinstance(spec, (tuple, list)) and len(spec) == 2 and all(_is_int(v) for v in spec)


def _parse_one(spec: Any, default_window: tuple[int, int] | None) -> AttentionMode:
    """One stage's mode from None/'global', 'window', 'window:7', 'window:14x16', 7 or (14, 16)."""
    if isinstance(spec, AttentionMode):
        return spec
    if spec is None:
        return GLOBAL
    if _is_int(spec):
        return AttentionMode("window", (int(spec), int(spec)))
    if isinstance(spec, (tuple, list)):
        return AttentionMode("window", (int(spec[0]), int(spec[1])))
    text = spec.strip().lower()
    if text == "global":
        return GLOBAL
    if text == "window":
        if default_window is None:
            raise ValueError("this stage has no default window; give a size, e.g. 'window:7'")
        return AttentionMode("window", default_window)
    match = re.fullmatch(r"window\s*[:=]?\s*(\d+)(?:\s*x\s*(\d+))?", text)
    if match is None:
        raise ValueError(f"cannot parse attention mode {spec!r}")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    return AttentionMode("window", (height, width))


def parse_attention_modes(
    spec: Any, block_types: Sequence[str], default_windows: Sequence[tuple[int, int] | None]
) -> dict[int, AttentionMode]:
    """Per-MOAT-stage modes from a spec, for a model with these block types and default windows.

    A single mode (``None``/``'global'``, ``'window'`` = the stage's default window, ``'window:7'``,
    ``'window:14x16'``, ``7``, ``(14, 16)`` or an :class:`AttentionMode`) applies to every MOAT
    stage. A mapping ``{stage_index: mode}`` sets some stages (indices count all stages, e.g. 2 and
    3). A sequence gives one mode per MOAT stage, or one per stage with the MBConv entries ignored
    (the official ``window_size=[None, None, [14, 14], [7, 7]]`` form, None meaning global).
    """
    moat_stages = [i for i, kind in enumerate(block_types) if kind == "moat"]
    if isinstance(spec, Mapping):
        items = {int(stage): value for stage, value in spec.items()}
    elif _is_single_spec(spec):
        items = dict.fromkeys(moat_stages, spec)
    elif isinstance(spec, Sequence):
        if len(spec) == len(moat_stages):
            items = dict(zip(moat_stages, spec, strict=True))
        elif len(spec) == len(block_types):
            items = {stage: spec[stage] for stage in moat_stages}
        else:
            raise ValueError(
                f"give {len(moat_stages)} modes (MOAT stages) or {len(block_types)} (all stages)"
            )
    else:
        raise TypeError(f"cannot parse attention modes from {spec!r}")
    unknown = set(items) - set(moat_stages)
    if unknown:
        raise ValueError(f"stages {sorted(unknown)} have no attention (MOAT stages: {moat_stages})")
    return {stage: _parse_one(value, default_windows[stage]) for stage, value in items.items()}


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


class SqueezeExcite(nn.Module):
    """SE of the MBConv: mean -> 1x1 (int(0.25 C_out)) -> swish -> 1x1 (4 C_out) -> sigmoid gate."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce_conv2d = nn.Conv2d(channels, reduced, 1)
        self.expand_conv2d = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.expand_conv2d(F.silu(self.reduce_conv2d(scale)))
        return x * torch.sigmoid(scale)


class MoatAttention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) map, global or in non-overlapping windows."""

    def __init__(
        self, dim: int, head_dim: int = _HEAD_DIM, position_embedding_size: int | None = None
    ) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"width {dim} is not a multiple of the head size {head_dim}")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.position_embedding_size = position_embedding_size
        # q/k/v are TF TrailDense [C, heads, 32] and o is [heads, 32, C]; as Linear the output (q/k/v)
        # or input (o) index is head * 32 + d.
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        if position_embedding_size is not None:
            size = 2 * position_embedding_size - 1
            self.relative_position_embedding = nn.Parameter(torch.zeros(self.num_heads, size, size))
        else:
            self.register_parameter("relative_position_embedding", None)

    def _bias_table(self, window: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
        """E resized to (heads, 2wh-1, 2ww-1) as TF ``image.resize`` (bilinear, half-pixel centres)."""
        table = self.relative_position_embedding
        if table is None:
            return None
        size = (2 * window[0] - 1, 2 * window[1] - 1)
        if tuple(table.shape[-2:]) != size:
            table = table[None].to(torch.promote_types(table.dtype, torch.float32))
            table = F.interpolate(table, size=size, mode="bilinear", align_corners=False)[0]
        return table.to(dtype)

    def _window_bias(self, window: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
        """(heads, T, T) bias inside one window, T = wh*ww, indexed E[key - query + w - 1]."""
        table = self._bias_table(window, dtype)
        if table is None:
            return None
        wh, ww = window
        device = table.device
        rows = torch.arange(wh, device=device).repeat_interleave(ww)
        cols = torch.arange(ww, device=device).repeat(wh)
        dh = rows[None, :] - rows[:, None] + wh - 1  # [query, key]
        dw = cols[None, :] - cols[:, None] + ww - 1
        return table[:, dh, dw]

    def _map_bias(
        self, grid: tuple[int, int], window: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        """(heads or 1, N, N) bias over the whole map: window bias within blocks, -inf across them."""
        height, width = grid
        wh, ww = window
        rows = torch.arange(height, device=device).repeat_interleave(width)
        cols = torch.arange(width, device=device).repeat(height)
        same = ((rows // wh)[:, None] == (rows // wh)[None, :]) & (
            (cols // ww)[:, None] == (cols // ww)[None, :]
        )
        table = self._bias_table(window, dtype)
        if table is None:
            if bool(same.all()):
                return None
            bias = torch.zeros((1, *same.shape), dtype=dtype, device=device)
        else:
            # Pairs in different windows may have offsets beyond the table; they are masked anyway.
            dh = (rows[None, :] - rows[:, None] + wh - 1).clamp(0, 2 * wh - 2)
            dw = (cols[None, :] - cols[:, None] + ww - 1).clamp(0, 2 * ww - 2)
            bias = table[:, dh, dw]
        return bias.masked_fill(~same, float("-inf"))

    def forward(self, x: torch.Tensor, mode: AttentionMode | None = None) -> torch.Tensor:
        batch, height, width, channels = x.shape
        mode = mode or GLOBAL
        if mode.mode == "window":
            window = (min(mode.window[0], height), min(mode.window[1], width))
        else:
            window = (height, width)
        record(
            self,
            "window",
            {"mode": mode.mode, "grid": (height, width), "window": window if mode.mode == "window" else None},
        )
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q(x) * self.scale
        k = self.k(x)
        v = self.v(x)
        explicit = wants(self, "attn")
        if explicit or height % window[0] or width % window[1]:
            # Whole-map path: needed for the (B, heads, N, N) capture and for ragged windows.
            def tokens(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(batch, height * width, heads, head_dim).transpose(1, 2)

            q, k, v = tokens(q), tokens(k), tokens(v)
            bias = self._map_bias((height, width), window, q.dtype, q.device)
            if explicit:
                logits = q @ k.transpose(-2, -1)
                if bias is not None:
                    logits = logits + bias
                # softmax in (at least) fp32, as the official code does for bf16 compute; the map is
                # recorded at that precision
                probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
                record(self, "attn", probs)
                out = probs.to(v.dtype) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
            out = out.transpose(1, 2).reshape(batch, height, width, channels)
        else:
            wh, ww = window
            nh, nw = height // wh, width // ww

            def windows(t: torch.Tensor) -> torch.Tensor:
                t = t.reshape(batch, nh, wh, nw, ww, heads, head_dim).permute(0, 1, 3, 5, 2, 4, 6)
                return t.reshape(batch * nh * nw, heads, wh * ww, head_dim)

            bias = self._window_bias(window, q.dtype)
            out = F.scaled_dot_product_attention(
                windows(q), windows(k), windows(v), attn_mask=bias, scale=1.0
            )
            out = out.reshape(batch, nh, nw, heads, wh, ww, head_dim).permute(0, 1, 4, 2, 5, 3, 6)
            out = out.reshape(batch, height, width, channels)
        return self.o(out)


class MoatBlock(nn.Module):
    """MBConv (with SE) or MOAT block (MBConv without SE, then ``x + Attn(LN(x))``)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        attention: bool = False,
        expansion: int = 4,
        se_ratio: float | None = 0.25,
        head_dim: int = _HEAD_DIM,
        position_embedding_size: int | None = None,
        pool_size: int = 2,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        inner = out_chs * expansion  # the official expansion is relative to the *output* width
        self.stride = stride
        self.pool_size = pool_size
        self.shortcut_conv = nn.Conv2d(in_chs, out_chs, 1) if in_chs != out_chs else None
        self.pre_norm = _bn(in_chs)
        self.expand_conv = nn.Conv2d(in_chs, inner, 1, bias=False)
        self.expand_norm = _bn(inner)
        self.depthwise_conv = Conv2dSame(inner, inner, 3, stride=stride, groups=inner, bias=False)
        self.depthwise_norm = _bn(inner)
        use_se = se_ratio is not None and not attention
        self.se = SqueezeExcite(inner, max(1, int(out_chs * se_ratio))) if use_se else None
        self.shrink_conv = nn.Conv2d(inner, out_chs, 1)
        if attention:
            self.attention_norm = nn.LayerNorm(out_chs, eps=_LN_EPS)
            self.attention = MoatAttention(out_chs, head_dim, position_embedding_size)
        else:
            self.attention_norm = None
            self.attention = None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, mode: AttentionMode | None = None) -> torch.Tensor:
        shortcut = x
        if self.stride > 1:
            shortcut = avg_pool_same(shortcut, self.pool_size, self.stride)
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_conv(shortcut)
        x = F.gelu(self.expand_norm(self.expand_conv(self.pre_norm(x))))
        x = F.gelu(self.depthwise_norm(self.depthwise_conv(x)))
        if self.se is not None:
            x = self.se(x)
        x = shortcut + self.drop_path(self.shrink_conv(x))
        if self.attention is not None:
            y = x.permute(0, 2, 3, 1)  # attention and LayerNorm work channels-last
            y = self.attention(self.attention_norm(y), mode).permute(0, 3, 1, 2)
            x = x + self.drop_path(y)
        return x


class MoatStage(nn.Sequential):
    """Blocks of one stage (named ``stages.S.B`` like TF ``block_SS_BB``).

    A MOAT stage resolves its attention mode when it runs (unless given one): the persistent
    ``attention_mode`` overlaid by the :func:`attention_mode` contexts of the calling thread. So any
    caller (``forward``, timm's ``features_only`` wrapper, a stage called alone) sees the same mode.
    """

    def __init__(
        self,
        blocks: Sequence[MoatBlock],
        stage_index: int,
        layout: tuple[tuple[str, ...], tuple[tuple[int, int] | None, ...]],
        global_last: bool = False,
    ) -> None:
        super().__init__(*blocks)
        self.stage_index = stage_index
        self.layout = layout  # (block_types, default_windows) of the model, to parse "all models" specs
        self.has_attention = layout[0][stage_index] == "moat"
        self.global_last = global_last
        self.attention_mode = GLOBAL  # persistent setting, changed by Moat.set_attention_mode

    def current_mode(self) -> AttentionMode:
        mode = self.attention_mode
        for kind, payload in _MODE_OVERRIDES.get():
            if kind == "stages":
                mode = payload.get(self, mode)
            else:
                mode = parse_attention_modes(payload, *self.layout).get(self.stage_index, mode)
        return mode

    def forward(self, x: torch.Tensor, mode: AttentionMode | None = None) -> torch.Tensor:  # type: ignore[override]
        if not self.has_attention:
            return super().forward(x)
        mode = mode or self.current_mode()  # resolved once per call, then passed down as an argument
        last = len(self) - 1
        for index, block in enumerate(self):
            x = block(x, GLOBAL if (self.global_last and index == last) else mode)
        return x


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class Moat(nn.Module):
    """MOAT backbone with the classification head (mean -> LayerNorm -> 1x1 conv).

    ``use_position_embedding=False`` builds the ``*_wo_position_embedding`` variants (no relative
    bias tables). ``attention_modes`` is an initial :meth:`set_attention_mode` spec (default: global
    everywhere, as deeplab2's ``get_model``); ``default_windows`` is what ``'window'`` means per stage.
    ``position_embedding_sizes`` is P per stage (14 and 7 as the official stride-16/32 tables).
    ``global_attention_at_end_of_moat_stage`` mirrors the official flag (last block of each MOAT
    stage always global). ``pool_size`` is the shortcut pooling kernel (2 for classification).
    """

    def __init__(
        self,
        widths: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 3, 7, 2),
        stem_width: int = 64,
        block_types: Sequence[str] = ("mbconv", "mbconv", "moat", "moat"),
        stem_stride: int = 2,
        stage_strides: Sequence[int] = (2, 2, 2, 2),
        position_embedding_sizes: Sequence[int | None] = (None, None, 14, 7),
        default_windows: Sequence[tuple[int, int] | None] = (None, None, (14, 14), (7, 7)),
        attention_modes: Any = None,
        use_position_embedding: bool = True,
        global_attention_at_end_of_moat_stage: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        expansion: int = 4,
        se_ratio: float = 0.25,
        head_dim: int = _HEAD_DIM,
        pool_size: int = 2,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        **_: Any,  # timm passes extra kwargs (e.g. pretrained_cfg leftovers); nothing else is used
    ) -> None:
        super().__init__()
        if not len(widths) == len(depths) == len(block_types) == len(stage_strides):
            raise ValueError("widths, depths, block_types and stage_strides must have one entry per stage")
        self.num_classes = num_classes
        self.block_types = tuple(block_types)
        self.moat_stages = tuple(i for i, kind in enumerate(block_types) if kind == "moat")
        self.default_windows = tuple(None if w is None else (int(w[0]), int(w[1])) for w in default_windows)
        self.use_position_embedding = use_position_embedding
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = widths[-1]

        self.stem = nn.Sequential(
            OrderedDict(
                conv_0=Conv2dSame(in_chans, stem_width, 3, stride=stem_stride),
                norm_0=_bn(stem_width),
                act_0=nn.GELU(),  # exact erf GELU, as tf.nn.gelu(approximate=False)
                conv_1=Conv2dSame(stem_width, stem_width, 3),
            )
        )
        total_blocks = sum(depths)
        block_id = 0
        in_chs = stem_width
        reduction = stem_stride
        stages: list[MoatStage] = []
        self.feature_info: list[dict[str, Any]] = []
        for stage_id, (width, depth, kind) in enumerate(zip(widths, depths, block_types, strict=True)):
            if kind not in ("mbconv", "moat"):
                raise ValueError(f"unknown block type {kind!r}")
            pe_size = position_embedding_sizes[stage_id] if use_position_embedding else None
            blocks = []
            for local_id in range(depth):
                stride = stage_strides[stage_id] if local_id == 0 else 1
                blocks.append(
                    MoatBlock(
                        in_chs,
                        width,
                        stride=stride,
                        attention=kind == "moat",
                        expansion=expansion,
                        se_ratio=se_ratio,
                        head_dim=head_dim,
                        position_embedding_size=pe_size if kind == "moat" else None,
                        pool_size=pool_size,
                        # official: survival decays linearly with the global block index
                        drop_path=drop_path_rate * block_id / total_blocks,
                    )
                )
                in_chs = width
                block_id += 1
            reduction *= stage_strides[stage_id]
            stages.append(
                MoatStage(
                    blocks,
                    stage_id,
                    (self.block_types, self.default_windows),
                    global_last=global_attention_at_end_of_moat_stage and kind == "moat",
                )
            )
            self.feature_info.append(
                {"num_chs": width, "reduction": reduction, "module": f"stages.{stage_id}"}
            )
        self.stages = nn.Sequential(*stages)

        self.final_layer_norm = nn.LayerNorm(widths[-1], eps=_LN_EPS)
        self.logits_head: nn.Module = (
            nn.Conv2d(widths[-1], num_classes, 1) if num_classes > 0 else nn.Identity()
        )

        if attention_modes is not None:
            self.set_attention_mode(attention_modes)
        self._init_weights()
        name_capture_points(self)

    def _init_weights(self) -> None:
        # official initialisers: normal(0.02) kernels (relative_position_embedding included), zero biases
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoatAttention) and module.relative_position_embedding is not None:
                nn.init.normal_(module.relative_position_embedding, std=0.02)

    # -- attention mode -------------------------------------------------------------------------

    def parse_attention_modes(self, spec: Any) -> dict[int, AttentionMode]:
        """Modes per MOAT stage index from a spec (see the module-level :func:`parse_attention_modes`)."""
        return parse_attention_modes(spec, self.block_types, self.default_windows)

    def set_attention_mode(self, modes: Any) -> None:
        """Persistently change the attention mode of MOAT stages (no reload; weights are shared).

        This changes the model for every caller; use :func:`attention_mode` for a per-call choice.
        """
        for stage_id, mode in self.parse_attention_modes(modes).items():
            self.stages[stage_id].attention_mode = mode

    def attention_modes(self) -> dict[int, AttentionMode]:
        """Modes in effect for the calling context: persistent ones overlaid by :func:`attention_mode`."""
        return {stage_id: self.stages[stage_id].current_mode() for stage_id in self.moat_stages}

    # -- forward --------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.final_layer_norm(x.mean((2, 3)))
        x = F.dropout(x, self.drop_rate, self.training)
        if pre_logits or isinstance(self.logits_head, nn.Identity):
            return x
        return self.logits_head(x[:, :, None, None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- timm API -------------------------------------------------------------------------------

    def get_classifier(self) -> nn.Module:
        return self.logits_head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.logits_head = nn.Conv2d(self.num_features, num_classes, 1) if num_classes > 0 else nn.Identity()
        name_capture_points(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_embedding")}


@contextmanager
def attention_mode(model: nn.Module | None, modes: Any) -> Iterator[None]:
    """Use ``modes`` for forwards run by the calling thread/context inside the block.

    ``model=None`` applies to every MOAT model; otherwise only to that instance. Two threads sharing
    one model may hold different modes at once: the override lives in a ``ContextVar``.
    """
    if model is None:
        entry: tuple[str, Any] = ("all", modes)
    elif isinstance(model, Moat):
        # parsed now, so a bad spec fails here and not at the first forward
        parsed = model.parse_attention_modes(modes)
        entry = ("stages", {model.stages[stage_id]: mode for stage_id, mode in parsed.items()})
    else:
        raise TypeError(f"expected a Moat model or None, got {type(model).__name__}")
    token = _MODE_OVERRIDES.set((*_MODE_OVERRIDES.get(), entry))
    try:
        yield
    finally:
        _MODE_OVERRIDES.reset(token)


# ----------------------------------------------------------------------------------------------
# TF checkpoint conversion
# ----------------------------------------------------------------------------------------------

_EMA_SUFFIX = "/ExponentialMovingAverage"
_BN_NAMES = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
_LN_NAMES = {"gamma": "weight", "beta": "bias"}
_CONV_NAMES = {"kernel": "weight", "bias": "bias"}
_BN_LAYERS = ("pre_norm", "expand_norm", "depthwise_norm")
_CONV_LAYERS = ("expand_conv", "shrink_conv", "shortcut_conv")
_SE_LAYERS = ("reduce_conv2d", "expand_conv2d")


def _conv_leaf(leaf: str) -> tuple[str, str]:
    """Torch leaf name and layout kind of a Keras Conv2D variable (kernel or bias)."""
    return _CONV_NAMES[leaf], "conv" if leaf == "kernel" else "plain"


def _tf_to_torch_name(name: str) -> tuple[str, str] | None:
    """(state_dict key, layout kind) for a MOAT TF variable name without ``:0``/EMA suffix."""
    if name.startswith("moat/"):
        name = name[len("moat/") :]  # the stem's Keras Sequential may drop the model scope
    parts = name.split("/")
    prefix = ""
    if parts[0] == "stem" and len(parts) == 3:
        layer, leaf = parts[1], parts[2]
        if re.fullmatch(r"conv_\d+", layer) and leaf in _CONV_NAMES:
            torch_leaf, kind = _conv_leaf(leaf)
            return f"stem.{layer}.{torch_leaf}", kind
        if re.fullmatch(r"norm_\d+", layer) and leaf in _BN_NAMES:
            return f"stem.{layer}.{_BN_NAMES[leaf]}", "bn"
        return None
    match = re.fullmatch(r"block_(\d+)_(\d+)", parts[0])
    if match is not None:
        prefix = f"stages.{int(match.group(1))}.{int(match.group(2))}."
        rest = parts[1:]
        if len(rest) == 2 and rest[0] in _BN_LAYERS and rest[1] in _BN_NAMES:
            return prefix + f"{rest[0]}.{_BN_NAMES[rest[1]]}", "bn"
        if len(rest) == 2 and rest[0] in _CONV_LAYERS and rest[1] in _CONV_NAMES:
            torch_leaf, kind = _conv_leaf(rest[1])
            return prefix + f"{rest[0]}.{torch_leaf}", kind
        if rest == ["depthwise_conv", "depthwise_kernel"]:
            return prefix + "depthwise_conv.weight", "depthwise"
        if len(rest) == 3 and rest[0] == "se" and rest[1] in _SE_LAYERS and rest[2] in _CONV_NAMES:
            torch_leaf, kind = _conv_leaf(rest[2])
            return prefix + f"se.{rest[1]}.{torch_leaf}", kind
        if len(rest) == 2 and rest[0] == "attention_norm" and rest[1] in _LN_NAMES:
            return prefix + f"attention_norm.{_LN_NAMES[rest[1]]}", "plain"
        if rest == ["attention", "relative_position_embedding"]:
            return prefix + "attention.relative_position_embedding", "plain"
        if len(rest) == 3 and rest[0] == "attention" and rest[1] in "qkvo" and rest[2] in ("weight", "bias"):
            kind = ("o_" if rest[1] == "o" else "qkv_") + rest[2]
            return prefix + f"attention.{rest[1]}.{rest[2]}", kind
        return None
    if len(parts) == 2 and parts[0] == "final_layer_norm" and parts[1] in _LN_NAMES:
        return f"final_layer_norm.{_LN_NAMES[parts[1]]}", "plain"
    if len(parts) == 2 and parts[0] == "logits_head" and parts[1] in _CONV_NAMES:
        torch_leaf, kind = _conv_leaf(parts[1])
        return f"logits_head.{torch_leaf}", kind
    return None


def _convert_layout(value: np.ndarray, kind: str) -> torch.Tensor:
    array = np.asarray(value)
    if kind == "conv":  # [kh, kw, in, out] -> [out, in, kh, kw]
        array = array.transpose(3, 2, 0, 1)
    elif kind == "depthwise":  # [kh, kw, C, multiplier] -> [C * multiplier, 1, kh, kw]
        kh, kw, channels, mult = array.shape
        array = array.transpose(2, 3, 0, 1).reshape(channels * mult, 1, kh, kw)
    elif kind == "qkv_weight":  # [C, heads, d] -> [heads * d, C]
        array = array.reshape(array.shape[0], -1).T
    elif kind == "o_weight":  # [heads, d, C] -> [C, heads * d]
        array = array.reshape(-1, array.shape[-1]).T
    elif kind == "qkv_bias":  # [heads, d] -> [heads * d]
        array = array.reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(array))


def convert_tf_variables(
    variables: Mapping[str, np.ndarray], prefer_ema: bool = False, strict: bool = False
) -> dict[str, torch.Tensor]:
    """Map deeplab2 MOAT Keras/TF variables to a :class:`Moat` ``state_dict``.

    Names may carry the ``:0`` suffix and the ``moat/`` scope or not. ``/ExponentialMovingAverage``
    copies are used instead of the raw values when ``prefer_ema`` (or when no raw value exists).
    Other variables (optimizer slots, ``global_step``) are skipped, or raise when ``strict``.
    Relative position embeddings are copied as they are: both sides index them key minus query.
    BatchNorm ``num_batches_tracked`` buffers are added as 0 so the result loads with ``strict=True``.
    """
    raw: dict[str, np.ndarray] = {}
    ema: dict[str, np.ndarray] = {}
    for name, value in variables.items():
        base = name[:-2] if name.endswith(":0") else name
        if base.endswith(_EMA_SUFFIX):
            ema[base[: -len(_EMA_SUFFIX)]] = value
        else:
            raw[base] = value
    state: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for base in sorted(set(raw) | set(ema)):
        target = _tf_to_torch_name(base)
        if target is None:
            skipped.append(base)
            continue
        key, kind = target
        value = ema[base] if (base in ema and (prefer_ema or base not in raw)) else raw[base]
        if key in state:
            raise ValueError(f"two TF variables map to {key} (one with and one without the 'moat/' scope?)")
        state[key] = _convert_layout(value, kind)
        if kind == "bn" and key.endswith(".running_mean"):
            state[key[: -len("running_mean")] + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    if strict and skipped:
        raise ValueError(
            f"TF variables not part of MOAT: {skipped[:10]}{' ...' if len(skipped) > 10 else ''}"
        )
    return state


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_NOTE = "TensorFlow checkpoint (.tar.gz): convert with scripts/convert_moat_tf.py, then load the safetensors file."


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,  # not confirmed for MOAT (the reference leaves the crop policy open)
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv_0",
        "classifier": "logits_head",
        "origin_url": "https://github.com/google-research/deeplab2",
        "paper_ids": "arXiv:2210.01820",
        "notes": (_NOTE,),
        **kwargs,
    }


def _tf_cfgs(model: str, ckpt: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Two tags per variant: the checkpoints with and without position embedding."""
    tag = "tf_" + ckpt.split("_imagenet_")[1]  # e.g. tf_1k_224, tf_22k_and_1k_384
    return {
        f"{model}.{tag}": _cfg(_TF_CKPT_URL.format(f"{ckpt}_w_position_embedding"), **kwargs),
        f"{model}.{tag}_no_pe": _cfg(_TF_CKPT_URL.format(f"{ckpt}_wo_position_embedding"), **kwargs),
    }


_IN22K_NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # (x - 127.5) / 127.5

default_cfgs = generate_default_cfgs(
    {
        **_tf_cfgs("moat_0", "moat0_imagenet_1k_224"),
        **_tf_cfgs("moat_1", "moat1_imagenet_1k_224"),
        **_tf_cfgs(
            "moat_2", "moat2_imagenet_22k_and_1k_384", input_size=(3, 384, 384), crop_pct=1.0, **_IN22K_NORM
        ),
        **_tf_cfgs(
            "moat_3", "moat3_imagenet_22k_and_1k_512", input_size=(3, 512, 512), crop_pct=1.0, **_IN22K_NORM
        ),
        **_tf_cfgs(
            "moat_4", "moat4_imagenet_22k_and_1k_512", input_size=(3, 512, 512), crop_pct=1.0, **_IN22K_NORM
        ),
        **{
            k: v
            for i in range(4)
            for k, v in _tf_cfgs(
                f"tiny_moat_{i}", f"tiny_moat{i}_imagenet_1k_256", input_size=(3, 256, 256)
            ).items()
        },
        "moat_cifar": _cfg(
            num_classes=10,
            input_size=(3, 32, 32),
            crop_pct=1.0,
            mean=_CIFAR_MEAN,
            std=_CIFAR_STD,
            origin_url="",
            notes=("HybridLens small-input configuration; no official weights.",),
        ),
    }
)


def _create_moat(variant: str, pretrained: bool = False, **kwargs: Any) -> Moat:
    tag = kwargs.get("pretrained_cfg")
    if isinstance(tag, str) and tag.endswith("_no_pe"):
        kwargs.setdefault("use_position_embedding", False)  # the *_wo_position_embedding checkpoints
    return build_model_with_cfg(
        Moat,
        variant,
        pretrained,
        feature_cfg={"out_indices": (0, 1, 2, 3), "flatten_sequential": True},
        **kwargs,
    )


def _variant(widths: Sequence[int], depths: Sequence[int], stem_width: int, **kwargs: Any) -> dict[str, Any]:
    return {"widths": tuple(widths), "depths": tuple(depths), "stem_width": stem_width, **kwargs}


# (widths, depths, stem width) from deeplab2's moat{0..4}_config / tiny_moat{0..3}_config
_VARIANTS = {
    "moat_0": _variant((96, 192, 384, 768), (2, 3, 7, 2), 64),
    "moat_1": _variant((96, 192, 384, 768), (2, 6, 14, 2), 64),
    "moat_2": _variant((128, 256, 512, 1024), (2, 6, 14, 2), 128),
    "moat_3": _variant((160, 320, 640, 1280), (2, 12, 28, 2), 160),
    "moat_4": _variant((256, 512, 1024, 2048), (2, 12, 28, 2), 256),
    "tiny_moat_0": _variant((32, 64, 128, 256), (2, 3, 7, 2), 32),
    "tiny_moat_1": _variant((40, 80, 160, 320), (2, 3, 7, 2), 40),
    "tiny_moat_2": _variant((56, 112, 224, 448), (2, 3, 7, 2), 56),
    "tiny_moat_3": _variant((80, 160, 320, 640), (2, 3, 7, 2), 80),
    # HybridLens CIFAR-10 configuration, see moat_cifar
    "moat_cifar": _variant(
        (64, 128, 192, 320),
        (2, 2, 3, 2),
        32,
        stem_stride=1,
        stage_strides=(2, 1, 2, 2),
        position_embedding_sizes=(None, None, 8, 4),
        default_windows=(None, None, (4, 4), (2, 2)),
    ),
}


def _build(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> Moat:
    return _create_moat(variant, pretrained, **{**_VARIANTS[variant], **kwargs})


@register_model
def moat_0(pretrained: bool = False, **kwargs: Any) -> Moat:
    return _build("moat_0", pretrained, kwargs)


@register_model
def moat_1(pretrained: bool = False, **kwargs: Any) -> Moat:
    return _build("moat_1", pretrained, kwargs)


@register_model
def moat_2(pretrained: bool = False, **kwargs: Any) -> Moat:
    return _build("moat_2", pretrained, kwargs)


@register_model
def moat_3(pretrained: bool = False, **kwargs: Any) -> Moat:
    return _build("moat_3", pretrained, kwargs)


@register_model
def moat_4(pretrained: bool = False, **kwargs: Any) -> Moat:
    return _build("moat_4", pretrained, kwargs)


@register_model
def tiny_moat_0(pretrained: bool = False, **kwargs: Any) -> Moat:
    return _build("tiny_moat_0", pretrained, kwargs)


@register_model
def tiny_moat_1(pretrained: bool = False, **kwargs: Any) -> Moat:
    return _build("tiny_moat_1", pretrained, kwargs)


@register_model
def tiny_moat_2(pretrained: bool = False, **kwargs: Any) -> Moat:
    return _build("tiny_moat_2", pretrained, kwargs)


@register_model
def tiny_moat_3(pretrained: bool = False, **kwargs: Any) -> Moat:
    return _build("tiny_moat_3", pretrained, kwargs)


@register_model
def moat_cifar(pretrained: bool = False, **kwargs: Any) -> Moat:
    """MOAT for 32x32 CIFAR-10 (HybridLens configuration, not from the paper).

    Stem stride 1 (32x32) and stage strides (2, 1, 2, 2) instead of stride 2 everywhere, so the maps
    are 16x16 (MBConv), 16x16 (MBConv), 8x8 (MOAT) and 4x4 (MOAT): the attention stages keep 64 and
    16 tokens (at 224 ImageNet they see 14x14 and 7x7). The position embedding sizes equal those
    maps (P = 8, 4), so global attention at 32x32 uses E unresized; ``'window'`` means 4x4 and 2x2
    windows, and any window (e.g. ``{2: 4}``) can be chosen at inference without retraining.
    """
    return _build("moat_cifar", pretrained, kwargs)

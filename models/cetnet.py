"""CETNet: Convolutional Embedding Makes Hierarchical Vision Transformer Stronger (Wang et al., ECCV 2022,
arXiv 2207.13317), reimplemented from the paper's text.

No official code or weights exist, so every detail the paper leaves open is a choice made here. Each one is
listed below (and repeated briefly where it is implemented); none of them claims to be the authors' code.

Layout (five stages S0-S4; module names in brackets)
  * S0 = ``stem``: 2 Fused-MBConv layers, strides 2 and 1 (paper). Width ``stem_chs[0]`` = C/4 (24 for -T/-S,
    32 for -B), hidden width = output width (expansion ratio 1, as EfficientNetV2's first fused stage). The
    first layer sees 3 RGB channels, so its hidden width is taken from its output width, not 3x ratio.
  * S1's convolutional embedding (CE) = ``stages.0.embed``: the same composition as S0 (paper): 2 Fused-MBConv
    layers, strides 2 and 1, at width ``stem_chs[1]`` = C/2 with expansion ratio 2 (paper: ratios 1 or 2),
    then the "regular conv" = a 1x1 conv (with bias) from C/2 to C that matches channels, then a LayerNorm.
    Together with S0 this gives the paper's "4 Fused-MBConv + 1 regular conv" stem and output stride 4.
  * CE of S2-S4 = ``stages.{1,2,3}.embed``: ``ce_depth`` MBConv layers (paper: MBConv units; depth 1/3/5/7
    ablation, 5 final). The first MBConv has stride 2 and maps C_in -> C_out = 2 C_in (no residual); the
    others are stride-1 residual MBConvs at C_out. A LayerNorm (over channels) ends every CE, like Swin's
    patch-merging norm, so the ViT blocks see normalised tokens whatever the CE depth.
  * Each stage then stacks LEWin blocks; a final LayerNorm on the last stage, global average pool, linear head.
  * ``forward_stage_features(x)`` returns the S1-S4 outputs (B, C, H, W); the last carries the final norm and
    equals ``forward_features(x)``. Any input size works (odd sizes: stride-2 convs round up, windows pad).

Constant parameters across CE depths (the paper kept params/FLOPs nearly constant: 28.11M vs 28.13M for 1 vs 3
layers, about Swin-T's 28.3M): every MBConv of one CE uses the same hidden width h, solved so that the CE has as
many conv weights as the Swin patch-merging layer it replaces (Linear(4 C_in, C_out): 4 C_in C_out weights):
    h = 4 C_in C_out / ((C_in + 9 + C_out) + (d - 1)(2 C_out + 9)),  rounded to a multiple of 8.
With C_out = 2 C_in this is an expansion ratio h / C_out of about 1.33, 0.36, 0.21, 0.15 for d = 1, 3, 5, 7:
deeper CEs are thinner (for d >= 3 the MBConv is a squeezing, not an expanding, bottleneck). That is the price
of holding parameters fixed while depth, and with it the receptive field, grows. The paper does not say how it
held the budget; this is the simplest rule that does. FLOPs stay close too (the stride-2 layer's 1x1 expansion
runs at the input resolution, so d = 1 costs a little more, as in the paper's 4.55G vs 4.48G).

Measured (this file; 1000 classes; GMACs at 224 by torch.utils.flop_counter, SDPA counted):
    ce_depth            1        3        5        7
    CE hidden -T    248/504/1016  72/136/280  40/80/160  24/56/112   (S2/S3/S4)
    cetnet_t        28.51M   28.52M   28.51M   28.50M    (4.97 / 4.85 / 4.83 / 4.81 GMACs; Swin-T 28.29M, 4.5G)
    cetnet_s        49.98M   49.99M   49.98M   49.97M    (Swin-S 49.61M)
    cetnet_b        88.30M   88.28M   88.31M   88.31M    (Swin-B 87.77M)
    cetnet_cifar     3.158M   3.158M   3.168M   3.167M   (about 0.052 GMACs at 32x32)
    CE hidden cifar  80/160/336   24/48/88   16/24/56   8/16/40
The extra ~0.3 GMACs over Swin-T come from the Fused-MBConv stem at stride 2/4.

MBConv / Fused-MBConv details (EfficientNetV2 convention): BatchNorm after every conv, SiLU after all but the
projecting 1x1 conv, no squeeze-excitation (not mentioned in the paper; omitting it keeps the budget rule exact),
residual only when stride 1 and width unchanged, no stochastic depth inside CEs.

LEWin block (locally-enhanced window attention)
  * Swin block structure: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))), MLP ratio 4 with GELU;
    blocks alternate window shift 0 and window // 2 (Swin).
  * Inside each (shifted) window the tokens are re-arranged as a wh x ww image and projected CvT-style: for
    each of q, k, v a depthwise 3x3 conv (stride 1, padding 1, zero padding at the window border, so nothing
    crosses windows) + BatchNorm, followed by a pointwise linear projection (``proj_q/k/v``; CvT names). The
    depthwise conv + pointwise linear is the paper's depthwise-separable convolutional projection. The three
    depthwise convs are stored as one ``conv_proj`` (weight (3C, 1, 3, 3), output 3c+j = q/k/v j of channel c).
  * Swin's learned relative position bias is kept (the paper describes the attention "as in Swin").
  * Window / shift for a feature map of H x W (per axis, as timm's Swin): window = min(window_size, H); the shift
    is 0 on an axis whose size fits in one window. The map is zero-padded bottom/right to a multiple of the
    window, then cyclically rolled by (-sh, -sw) (pad-then-roll, as the original Swin detection code) and cut
    into windows in row-major order. Attention between tokens that were not neighbours before the roll, and
    attention to padded keys, gets -100 added to the logit (Swin's mask value).
  * Attention runs through ``F.scaled_dot_product_attention`` unless someone captures ``attn``, in which case it
    is computed explicitly (identical maths) so the softmax map exists.

Widths / depths (paper: "match Swin-T/S/B"; exact numbers are in its supplement, not confirmed): Swin's
  -T: C=96, depths 2-2-6-2, heads 3-6-12-24; -S: C=96, 2-2-18-2, 3-6-12-24; -B: C=128, 2-2-18-2, 4-8-16-32;
  window 7, MLP ratio 4, qkv bias. Stochastic depth defaults to 0 (pass ``drop_path_rate``; Swin used
  0.2/0.3/0.5).

``cetnet_cifar`` (32x32, 10 classes): C=32, depths 2-2-6-2, heads 2-4-8-16 (head dim 16), window 4, stem widths
  16/32. S0 keeps stride 1 (both layers) and S1's CE keeps its stride 2, so the stages see 16, 8, 4, 2 tokens
  per side (output stride 16 instead of 32: at 32x32 input the ImageNet strides would leave a 1x1 last map).
  With window 4, S3 (4x4) and S4 (2x2) are single windows without shift (rule above). About 3.1M parameters.

Captured maps (models/capture.py; names are module paths):
  * ``stem.output``: S0 output (B, stem_chs[0], H/s, W/s), s = stem_strides[0] (recorded by the model).
  * ``stages.{i}.embed.output``: the CE output after its LayerNorm, (B, C_i, H_i, W_i).
  * ``stages.{i}.blocks.{j}.attn.attn``: softmax attention per window, (B, heads, nW, wh*ww, wh*ww); windows in
    row-major order over the padded and rolled grid of ceil(H/wh) x ceil(W/ww) windows. Token a of window n
    sits at rolled position (wy*wh + a // ww, wx*ww + a % ww), i.e. original padded position
    ((y + sh) mod Hp, (x + sw) mod Wp). Rows include padded tokens when H, W are not window multiples.
  * ``stages.{i}.blocks.{j}.attn.window``: {"grid": (H, W), "window": (wh, ww), "shift": (sh, sw)}.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from models.capture import name_capture_points, record, wants

__all__ = ["CETNet", "ce_hidden_width"]

MASK_VALUE = -100.0  # Swin's additive mask for forbidden (non-neighbouring or padded) keys


def _round8(value: float) -> int:
    return max(8, int(round(value / 8.0)) * 8)


def ce_hidden_width(in_chs: int, out_chs: int, depth: int) -> int:
    """Hidden width shared by the ``depth`` MBConvs of one CE, holding its conv weights at Swin's budget.

    Budget = 4 * in * out (Swin patch merging). Weights of an MBConv with hidden width h: h * (in + 9 + out)
    (1x1 expand, 3x3 depthwise, 1x1 project); the first layer maps in -> out, the others out -> out.
    """
    if depth < 1:
        raise ValueError(f"ce_depth must be >= 1, got {depth}")
    per_width = (in_chs + 9 + out_chs) + (depth - 1) * (2 * out_chs + 9)
    return _round8(4 * in_chs * out_chs / per_width)


class ConvNormAct(nn.Sequential):
    """Conv (no bias) + BatchNorm (+ SiLU); 'same' padding for odd kernels."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.SiLU() if act else nn.Identity()


class FusedMBConv(nn.Module):
    """EfficientNetV2 Fused-MBConv: 3x3 conv (expand, strided) -> 1x1 projection, residual when shapes allow."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, hidden_chs: int) -> None:
        super().__init__()
        self.conv_exp = ConvNormAct(in_chs, hidden_chs, 3, stride)
        self.conv_pwl = ConvNormAct(hidden_chs, out_chs, 1, act=False)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_pwl(self.conv_exp(x))
        return out + x if self.has_skip else out


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand -> 3x3 depthwise (strided) -> 1x1 project; no SE (see module doc)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, hidden_chs: int) -> None:
        super().__init__()
        self.conv_pw = ConvNormAct(in_chs, hidden_chs, 1)
        self.conv_dw = ConvNormAct(hidden_chs, hidden_chs, 3, stride, groups=hidden_chs)
        self.conv_pwl = ConvNormAct(hidden_chs, out_chs, 1, act=False)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_pwl(self.conv_dw(self.conv_pw(x)))
        return out + x if self.has_skip else out


class StemEmbed(nn.Module):
    """S1's CE: 2 Fused-MBConv (same composition as S0) + 1x1 conv to the stage width + LayerNorm."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, stride: int = 2) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            FusedMBConv(in_chs, mid_chs, stride, 2 * in_chs),
            FusedMBConv(mid_chs, mid_chs, 1, 2 * mid_chs),
        )
        self.proj = nn.Conv2d(mid_chs, out_chs, 1)
        self.norm = LayerNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.proj(self.layers(x)))
        record(self, "output", x)
        return x


class ConvEmbed(nn.Module):
    """CE of S2-S4: ``depth`` MBConvs (first one strided, in -> out) sharing hidden width, then LayerNorm."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int = 2) -> None:
        super().__init__()
        hidden = ce_hidden_width(in_chs, out_chs, depth)
        self.hidden_chs = hidden
        self.layers = nn.Sequential(
            MBConv(in_chs, out_chs, stride, hidden),
            *[MBConv(out_chs, out_chs, 1, hidden) for _ in range(depth - 1)],
        )
        self.norm = LayerNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.layers(x))
        record(self, "output", x)
        return x


def relative_position_index(win_h: int, win_w: int, table_window: int, device: torch.device | None = None
                            ) -> torch.Tensor:
    """(N, N) index into a ((2w-1)^2)-row bias table for a win_h x win_w window (win_h, win_w <= w)."""
    coords = torch.stack(torch.meshgrid(torch.arange(win_h, device=device), torch.arange(win_w, device=device),
                                        indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    span = 2 * table_window - 1
    return (rel[0] + table_window - 1) * span + (rel[1] + table_window - 1)


def window_attention_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int],
                          device: torch.device | None = None) -> torch.Tensor | None:
    """Additive (nW, N, N) mask for the padded-and-rolled grid, or None when nothing needs masking.

    Keys are forbidden when they were not in the query's contiguous region before the cyclic roll (Swin's
    three bands per axis) or when they are padding.
    """
    (wh, ww), (sh, sw) = window, shift
    hp, wp = -(-height // wh) * wh, -(-width // ww) * ww
    if not (sh or sw or hp != height or wp != width):
        return None
    ys = torch.arange(hp, device=device)
    xs = torch.arange(wp, device=device)
    # rolled position p holds original padded position (p + shift) mod padded size
    band_y = (ys >= hp - wh).long() + (ys >= hp - sh).long() if sh else torch.zeros_like(ys)
    band_x = (xs >= wp - ww).long() + (xs >= wp - sw).long() if sw else torch.zeros_like(xs)
    region = band_y[:, None] * 3 + band_x[None, :]
    pad = ((ys + sh) % hp >= height)[:, None] | ((xs + sw) % wp >= width)[None, :]

    def to_windows(grid: torch.Tensor) -> torch.Tensor:
        return grid.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)

    region_w, pad_w = to_windows(region), to_windows(pad)
    forbidden = (region_w[:, :, None] != region_w[:, None, :]) | pad_w[:, None, :]
    return torch.zeros(forbidden.shape, device=device).masked_fill(forbidden, MASK_VALUE)


class LEWinAttention(nn.Module):
    """(Shifted) window attention with a CvT-style depthwise-separable conv projection inside each window.

    Input and output (B, H, W, C); the module pads, rolls, partitions and reverses itself so that the captured
    map and its window geometry come from one place.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size
        self.shift_size = shift_size
        # CvT conv projection: depthwise 3x3 + BN for each of q/k/v, then the pointwise (linear) part. The three
        # depthwise convs run as one conv with 3 outputs per input channel (output 3c+j = projection j of channel
        # c, j = q, k, v): the same maths as three separate convs + BNs, in one kernel launch.
        self.conv_proj = ConvNormAct(dim, 3 * dim, 3, groups=dim, act=False)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index",
                             relative_position_index(window_size, window_size, window_size), persistent=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if not self.relative_position_bias_table.is_meta:
            trunc_normal_(self.relative_position_bias_table, std=0.02)

    def window_and_shift(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Effective window and shift for an H x W map: clip the window, drop the shift on axes that fit."""
        wh, ww = min(self.window_size, height), min(self.window_size, width)
        sh = self.shift_size if height > self.window_size else 0
        sw = self.shift_size if width > self.window_size else 0
        return (wh, ww), (sh, sw)

    def relative_bias(self, win_h: int, win_w: int) -> torch.Tensor:
        """(heads, N, N) bias for a win_h x win_w window."""
        if (win_h, win_w) == (self.window_size, self.window_size):
            index = self.relative_position_index
        else:  # clipped window on a small map: its offsets are a subset of the table
            index = relative_position_index(win_h, win_w, self.window_size, self.relative_position_bias_table.device)
        n = win_h * win_w
        return self.relative_position_bias_table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)

    def _project(self, linear: nn.Linear, conv_out: torch.Tensor, batch: int) -> torch.Tensor:
        # conv_out: (B*nW, C, wh, ww) -> (B, nW, heads, N, head_dim)
        tokens = linear(conv_out.flatten(2).transpose(1, 2))
        bnw, n, _ = tokens.shape
        return tokens.reshape(batch, bnw // batch, n, self.num_heads, self.head_dim).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, chs = x.shape
        (wh, ww), (sh, sw) = self.window_and_shift(height, width)
        pad_b, pad_r = (-height) % wh, (-width) % ww
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        nwh, nww = hp // wh, wp // ww
        windows = (x.reshape(batch, nwh, wh, nww, ww, chs).permute(0, 1, 3, 5, 2, 4)
                   .reshape(batch * nwh * nww, chs, wh, ww))
        conv_q, conv_k, conv_v = self.conv_proj(windows).unflatten(1, (chs, 3)).unbind(2)
        q = self._project(self.proj_q, conv_q, batch)
        k = self._project(self.proj_k, conv_k, batch)
        v = self._project(self.proj_v, conv_v, batch)

        bias = self.relative_bias(wh, ww).unsqueeze(0)  # (1, heads, N, N)
        mask = window_attention_mask(height, width, (wh, ww), (sh, sw), x.device)
        if mask is not None:
            bias = bias + mask.unsqueeze(1)  # (nW, heads, N, N)
        bias = bias.to(q.dtype)

        if wants(self, "attn"):  # explicit softmax only while someone captures the map
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            record(self, "attn", attn.transpose(1, 2))  # (B, heads, nW, N, N)
            out = self.attn_drop(attn) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
        if wants(self, "window"):
            record(self, "window", {"grid": (height, width), "window": (wh, ww), "shift": (sh, sw)})

        out = self.proj_drop(self.proj(out.transpose(2, 3).reshape(batch, nwh, nww, wh, ww, chs)))
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, chs)
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return out[:, :height, :width, :]


class LEWinBlock(nn.Module):
    """Swin-style pre-norm block with LEWin attention; works on (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0
                 ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LEWinAttention(dim, num_heads, window_size, shift_size, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class CETStage(nn.Module):
    """Convolutional embedding followed by LEWin blocks; (B, C, H, W) in and out."""

    def __init__(self, embed: nn.Module, dim: int, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, qkv_bias: bool, proj_drop: float, attn_drop: float, drop_path: list[float]
                 ) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = nn.Sequential(*[
            LEWinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias,
                       proj_drop, attn_drop, drop_path[i])
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)
        return self.blocks(x).permute(0, 3, 1, 2)


class CETNet(nn.Module):
    """Hierarchical hybrid: Fused-MBConv stem, MBConv convolutional embeddings, LEWin transformer blocks."""

    def __init__(
            self,
            embed_dim: int = 96,
            depths: tuple[int, ...] = (2, 2, 6, 2),
            num_heads: tuple[int, ...] = (3, 6, 12, 24),
            window_size: int = 7,
            ce_depth: int = 5,
            stem_chs: tuple[int, int] = (24, 48),
            stem_strides: tuple[int, int] = (2, 2),
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.ce_depth = ce_depth
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.num_features = self.head_hidden_size = dims[-1]

        c0, c1 = stem_chs
        # S0: Fused-MBConv strides (stem_strides[0], 1); expansion 1 (first layer: hidden = its output width)
        self.stem = nn.Sequential(
            FusedMBConv(in_chans, c0, stem_strides[0], c0),
            FusedMBConv(c0, c0, 1, c0),
        )
        # stochastic depth rising linearly over all blocks (Swin); plain Python so meta-device builds work
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        dpr = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]
        stages = []
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads, strict=True)):
            if i == 0:
                embed: nn.Module = StemEmbed(c0, c1, dim, stem_strides[1])
            else:
                embed = ConvEmbed(dims[i - 1], dim, ce_depth)
            stages.append(CETStage(embed, dim, depth, heads, window_size, mlp_ratio, qkv_bias, proj_drop_rate,
                                   attn_drop_rate, dpr[i]))
        self.stages = nn.ModuleList(stages)
        self.norm = LayerNorm2d(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        stride = stem_strides[0] * stem_strides[1]
        self.feature_info = []
        for i, dim in enumerate(dims):
            self.feature_info.append({"num_chs": dim, "reduction": stride * 2 ** i, "module": f"stages.{i}"})

        self.apply(self._init_weights)
        name_capture_points(self)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_meta:  # shape-only build: nothing to initialise
            return
        if isinstance(module, nn.Linear):  # Swin/ViT init for the transformer parts
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # EfficientNet-style init for the conv parts
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if "relative_position_bias_table" in name}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        name_capture_points(self.head, "head")

    def forward_stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of S1-S4 as (B, C, H, W); the last one has the final norm (equals ``forward_features``)."""
        x = self.stem(x)
        record(self.stem, "output", x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        feats[-1] = self.norm(feats[-1])
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stage_features(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # no url: there are no official weights (local files load via pretrained_cfg_overlay=dict(file=...))
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.conv_exp.conv", "classifier": "head", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "cetnet_t": _cfg(),
    "cetnet_s": _cfg(),
    "cetnet_b": _cfg(),
    "cetnet_cifar": _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0,
                         mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
})


def _create_cetnet(variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> CETNet:
    return build_model_with_cfg(CETNet, variant, pretrained, **dict(model_args, **kwargs))


@register_model
def cetnet_t(pretrained: bool = False, **kwargs: Any) -> CETNet:
    """CETNet-T: Swin-T widths/depths (C=96, 2-2-6-2, heads 3-6-12-24, window 7)."""
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, stem_chs=(24, 48))
    return _create_cetnet("cetnet_t", pretrained, args, **kwargs)


@register_model
def cetnet_s(pretrained: bool = False, **kwargs: Any) -> CETNet:
    """CETNet-S: Swin-S widths/depths (C=96, 2-2-18-2, heads 3-6-12-24, window 7)."""
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7, stem_chs=(24, 48))
    return _create_cetnet("cetnet_s", pretrained, args, **kwargs)


@register_model
def cetnet_b(pretrained: bool = False, **kwargs: Any) -> CETNet:
    """CETNet-B: Swin-B widths/depths (C=128, 2-2-18-2, heads 4-8-16-32, window 7)."""
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7, stem_chs=(32, 64))
    return _create_cetnet("cetnet_b", pretrained, args, **kwargs)


@register_model
def cetnet_cifar(pretrained: bool = False, **kwargs: Any) -> CETNet:
    """CIFAR-10 config: C=32, 2-2-6-2, heads 2-4-8-16, window 4, S0 stride 1 (stages at 16/8/4/2 tokens)."""
    args = dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16), window_size=4, stem_chs=(16, 32),
                stem_strides=(1, 2), num_classes=10)
    return _create_cetnet("cetnet_cifar", pretrained, args, **kwargs)

"""Mobile-Former: "Bridging MobileNet and Transformer" (CVPR 2022, arXiv 2108.05895).

A MobileNet-style convolution path (the *Mobile*, feature map X) runs in parallel with a handful of
global tokens Z (the *Former*), joined by two light cross-attention bridges per block. Written from
the architecture facts of the reference code (AAboys/MobileFormer, ``mobile_former.py`` and
``dna_blocks.py``); module and parameter names follow that code, so an official checkpoint
(``torch.load(f)["state_dict"]``) loads with ``strict=True``.

Only the configuration every released factory builds is implemented: attention bridges with no
projection of the local features (K = V = X in Mobile->Former, Q = X in Mobile<-Former), dynamic
gate in Mobile->Former only, Former with FFN, dynamic ReLU driven by token 0 after the two
depthwise/expansion convolutions, plain ReLU6 classifier that concatenates token 0.

Layout: tokens are kept batch-first, (B, T, Ct), here; the reference keeps (T, B, Ct). Both split
channels into heads as contiguous slices, so the computation (and the checkpoint) is the same.

Captured maps (``models.capture``), for every block ``i`` that has bridges (all but the conv-only
``features.0``), and for the extra Mobile->Former in front of the classifier (``local_global``):

* ``features.{i}.local_global.attn``  (B, 2, T, H, W): Mobile->Former attention, each token's
  softmax over the H*W pixels of the block *input* (rows sum to 1 over H, W). The reference
  returns the pre-softmax logits of this map and never uses them; we record the softmax.
* ``features.{i}.global_local.attn``  (B, 2, H, W, T): Mobile<-Former attention, each pixel of
  the block *output* (before the bridge is added) over the T tokens (sums to 1 over T).
* ``features.{i}.tokens``             (B, T, Ct): the tokens the block hands on.
* ``local_global.attn``               (B, 2, T, H, W): the final Mobile->Former before the head.

Outside a capture both bridges use ``F.scaled_dot_product_attention``; the explicit softmax runs
only while someone captures that map.

Deviation from the reference code: ``DropPath`` on tokens drops whole samples here; in the
reference, whose tokens are (T, B, Ct), it drops whole tokens for the entire batch. This only
matters for training with ``drop_path_rate > 0`` (all released factories build with 0 at
inference; the reference trains with 0.1 or so). Inference and the state_dict are identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from models.capture import name_capture_points, record, wants

__all__ = ["MobileFormer", "MobileToFormer", "Former", "FormerToMobile", "BlockCfg"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

BRIDGE_HEADS = 2  # both bridges, every variant
FORMER_HEADS = 4  # token self-attention; the reference never passes its heads argument


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """ReLU6(x + 3) / 6, the reference's h_sigmoid (not the logistic sigmoid)."""
    return F.relu6(x + 3.0) / 6.0


class HardSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hard_sigmoid(x)


class HardSwish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * hard_sigmoid(x)


class ChannelShuffle(nn.Module):
    """ShuffleNet channel shuffle; only the grouped (26m) variant has one, parameter-free."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _shuffle_or_identity(group_num: int, groups: int) -> nn.Module:
    # The reference puts an empty nn.Sequential where there is no shuffle; either has no
    # parameters, so the Sequential indices (and checkpoint keys) stay the same.
    return ChannelShuffle(groups) if group_num > 1 else nn.Identity()


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads), heads taking contiguous channel slices."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _pixels_as_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Feature map (B, C, H, W) -> (B, heads, H*W, C / heads): pixels as keys/queries, no projection."""
    b, c, h, w = x.shape
    return x.reshape(b, heads, c // heads, h * w).transpose(-1, -2)


class HyperFunc(nn.Module):
    """Token 0 -> Linear -> ReLU -> Linear -> hard sigmoid: the 2M coefficients of a dynamic ReLU."""

    def __init__(self, token_dim: int, out_dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = token_dim // reduction
        self.hyper = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim), HardSigmoid())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hyper(tokens[:, 0])[:, :, None, None]


def dynamic_relu(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """max(k1 x, k2 x) per channel, k1 = 2 (a1 - 0.5) + 1 in [0, 2], k2 = 2 (a2 - 0.5) in [-1, 1]."""
    a1, a2 = coeffs.chunk(2, dim=1)
    return torch.maximum(x * (2.0 * (a1 - 0.5) + 1.0), x * (2.0 * (a2 - 0.5)))


class MobileToFormer(nn.Module):
    """Mobile->Former (reference ``Local2Global``): tokens attend to the pixels of X.

    q = Linear(Ct->C)(Z) split into 2 heads, K = V = X (no projection), softmax over H*W, scale
    (C/2)^-1/2; the result is gated by 2 * hsig(Linear(Ct->C)(Z)), projected back to Ct and added
    to Z, followed by LayerNorm (post-norm).
    """

    def __init__(self, dim: int, token_dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.num_heads = BRIDGE_HEADS
        self.scale = (dim // self.num_heads) ** -0.5
        self.alpha = nn.Sequential(nn.Linear(token_dim, dim), HardSigmoid())
        self.q = nn.Linear(token_dim, dim)
        self.proj = nn.Linear(dim, token_dim)
        self.layer_norm = nn.LayerNorm(token_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        q = _split_heads(self.q(tokens), self.num_heads)  # (B, 2, T, C/2)
        kv = _pixels_as_heads(x, self.num_heads)  # (B, 2, HW, C/2)
        if wants(self, "attn"):
            attn = torch.softmax((q @ kv.transpose(-1, -2)) * self.scale, dim=-1)  # (B, 2, T, HW)
            record(self, "attn", attn.unflatten(-1, (h, w)))
            out = attn @ kv
        else:
            out = F.scaled_dot_product_attention(q, kv, kv, scale=self.scale)
        out = _merge_heads(out) * (2.0 * self.alpha(tokens))
        return self.layer_norm(tokens + self.drop_path(self.proj(out)))


class Former(nn.Module):
    """Token self-attention (reference ``GlobalBlock``): q = Linear(Z), K = V = Z, 4 heads, then FFN.

    Post-norm: Z <- LN(Z + Linear(attn)), Z <- LN(Z + FFN(Z)); the FFN residual has no drop path
    in the reference.
    """

    def __init__(self, token_dim: int, ffn_ratio: int = 2, drop_path: float = 0.0) -> None:
        super().__init__()
        self.num_heads = FORMER_HEADS
        self.scale = (token_dim // self.num_heads) ** -0.5
        self.ffn = nn.Sequential(
            nn.Linear(token_dim, token_dim * ffn_ratio), nn.GELU(), nn.Linear(token_dim * ffn_ratio, token_dim)
        )
        self.ffn_norm = nn.LayerNorm(token_dim)
        self.q = nn.Linear(token_dim, token_dim)
        self.channel_mlp = nn.Linear(token_dim, token_dim)
        self.layer_norm = nn.LayerNorm(token_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.q(tokens), self.num_heads)
        kv = _split_heads(tokens, self.num_heads)
        out = _merge_heads(F.scaled_dot_product_attention(q, kv, kv, scale=self.scale))
        tokens = self.layer_norm(tokens + self.drop_path(self.channel_mlp(out)))
        return self.ffn_norm(tokens + self.ffn(tokens))


class FormerToMobile(nn.Module):
    """Mobile<-Former (reference ``Global2Local``): each pixel of X attends to the T tokens.

    Q = X (no projection), K = Linear(Ct->C)(Z), V = ``proj``(Z), 2 heads, softmax over T, scale
    (C/2)^-1/2; X <- X + attn V.
    """

    def __init__(self, dim: int, token_dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.num_heads = BRIDGE_HEADS
        self.scale = (dim // self.num_heads) ** -0.5
        self.k = nn.Linear(token_dim, dim)
        self.proj = nn.Linear(token_dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = _pixels_as_heads(x, self.num_heads)  # (B, 2, HW, C/2)
        k = _split_heads(self.k(tokens), self.num_heads)  # (B, 2, T, C/2)
        v = _split_heads(self.proj(tokens), self.num_heads)
        if wants(self, "attn"):
            attn = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1)  # (B, 2, HW, T)
            record(self, "attn", attn.unflatten(2, (h, w)))
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.drop_path(out)


class _Bridged(nn.Module):
    """Shared construction of the Mobile->Former, Former and Mobile<-Former of a block."""

    def _add_bridges(self, in_chs: int, out_chs: int, token_dim: int, drop_path: float) -> None:
        self.local_global = MobileToFormer(in_chs, token_dim, drop_path)
        self.global_block = Former(token_dim, drop_path=drop_path)
        self.global_local = FormerToMobile(out_chs, token_dim, drop_path)


class ConvBlock(nn.Module):
    """Conv-only first block (reference ``DnaBlock3`` with e2 = 0): DW3x3 (x e1) -> BN -> ReLU6 -> 1x1 -> BN."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, exp: int, group_num: int = 1) -> None:
        super().__init__()
        hidden = in_chs * exp
        self.identity = stride == 1 and in_chs == out_chs
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, hidden, 3, stride, 1, groups=in_chs, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            _shuffle_or_identity(group_num, in_chs),
            nn.Conv2d(hidden, out_chs, 1, groups=group_num, bias=False),
            nn.BatchNorm2d(out_chs),
        )

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.conv(x)
        return (out + x if self.identity else out), tokens


class DnaBlockDown(_Bridged):
    """Reference ``DnaBlock3`` (the stride-2 block): L2G -> Former -> conv path -> G2L.

    DW3x3(stride, x e1) -> BN -> DyReLU -> 1x1 -> BN (kept as r) -> DW3x3(x e2) -> BN -> DyReLU ->
    1x1 -> BN, plus r; then Mobile<-Former, then the input if the shape is unchanged.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int,
        exp1: int,
        exp2: int,
        token_dim: int,
        group_num: int = 1,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        hidden1, hidden2 = round(in_chs * exp1), round(out_chs * exp2)
        self.identity = stride == 1 and in_chs == out_chs
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_chs, hidden1, 3, stride, 1, groups=in_chs, bias=False),
            nn.BatchNorm2d(hidden1),
            _shuffle_or_identity(group_num, in_chs),
        )
        self.hyper1 = HyperFunc(token_dim, 2 * hidden1)
        self.conv2 = nn.Sequential(nn.Conv2d(hidden1, out_chs, 1, groups=group_num, bias=False), nn.BatchNorm2d(out_chs))
        self.conv3 = nn.Sequential(
            nn.Conv2d(out_chs, hidden2, 3, 1, 1, groups=out_chs, bias=False),
            nn.BatchNorm2d(hidden2),
            _shuffle_or_identity(group_num, out_chs),
        )
        self.hyper3 = HyperFunc(token_dim, 2 * hidden2)
        self.conv4 = nn.Sequential(nn.Conv2d(hidden2, out_chs, 1, groups=group_num, bias=False), nn.BatchNorm2d(out_chs))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._add_bridges(in_chs, out_chs, token_dim, drop_path)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.global_block(self.local_global(x, tokens))
        out = dynamic_relu(self.conv1(x), self.hyper1(tokens))
        short = self.conv2(out)
        out = dynamic_relu(self.conv3(short), self.hyper3(tokens))
        out = self.drop_path(self.conv4(out)) + short
        out = self.global_local(out, tokens)
        if self.identity:
            out = out + x
        record(self, "tokens", tokens)
        return out, tokens


class DnaBlock(_Bridged):
    """Reference ``DnaBlock``: L2G -> Former -> 1x1 (x e1) -> BN -> DyReLU -> DW3x3 -> BN -> DyReLU ->
    1x1 -> BN, identity skip, *then* Mobile<-Former (the reference's ``gbr_before_skip=False``)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int,
        exp1: int,
        token_dim: int,
        group_num: int = 1,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = round(in_chs * exp1)
        self.identity = stride == 1 and in_chs == out_chs
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_chs, hidden, 1, groups=group_num, bias=False),
            nn.BatchNorm2d(hidden),
            _shuffle_or_identity(group_num, group_num),
        )
        self.hyper1 = HyperFunc(token_dim, 2 * hidden)
        self.conv2 = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden)
        )
        self.hyper2 = HyperFunc(token_dim, 2 * hidden)
        self.conv3 = nn.Sequential(
            nn.Conv2d(hidden, out_chs, 1, groups=group_num, bias=False),
            nn.BatchNorm2d(out_chs),
            _shuffle_or_identity(group_num, group_num),
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._add_bridges(in_chs, out_chs, token_dim, drop_path)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.global_block(self.local_global(x, tokens))
        out = dynamic_relu(self.conv1(x), self.hyper1(tokens))
        out = dynamic_relu(self.conv2(out), self.hyper2(tokens))
        out = self.conv3(out)
        if self.identity:
            out = self.drop_path(out) + x
        out = self.global_local(out, tokens)
        record(self, "tokens", tokens)
        return out, tokens


class MergeClassifier(nn.Module):
    """1x1 (-> 6C) -> BN -> ReLU6 -> mean -> h-swish, concat token 0, Linear -> BN1d -> h-swish -> Dropout -> Linear."""

    def __init__(
        self,
        in_chs: int,
        hidden_size: int,
        num_classes: int,
        token_dim: int,
        group_num: int = 1,
        exp: int = 6,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        conv_chs = in_chs * exp
        self.conv = nn.Sequential(
            _shuffle_or_identity(group_num, group_num),
            nn.Conv2d(in_chs, conv_chs, 1, groups=group_num, bias=False),
            nn.BatchNorm2d(conv_chs),
        )
        self.fc = nn.Sequential(nn.Linear(conv_chs + token_dim, hidden_size), nn.BatchNorm1d(hidden_size), HardSwish())
        self.classifier = nn.Sequential(
            nn.Dropout(drop_rate), nn.Linear(hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        )

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.relu6(self.conv(x)).mean((2, 3))
        x = self.fc(torch.cat([x * hard_sigmoid(x), tokens[:, 0]], dim=1))
        return x if pre_logits else self.classifier(x)


@dataclass(frozen=True)
class BlockCfg:
    """One block of the reference block list.

    kind: "conv" (conv-only, no bridges), "down" (``DnaBlock3``) or "dna" (``DnaBlock``).
    """

    kind: str
    out_chs: int
    stride: int
    exp1: int
    exp2: int = 4


class MobileFormer(nn.Module):
    """Mobile-Former. ``forward_features`` returns the last feature map; the head needs the tokens too,
    so ``forward_head(x, tokens)`` takes both (``forward_trunk`` returns them)."""

    def __init__(
        self,
        blocks: Sequence[BlockCfg],
        stem_chs: int = 16,
        token_num: int = 6,
        token_dim: int = 192,
        head_hidden_size: int = 1920,
        group_num: int = 1,
        stem_stride: int = 2,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.token_num, self.token_dim = token_num, token_dim
        self.tokens = nn.Embedding(token_num, token_dim)  # learned initial global tokens
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_chs, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(stem_chs), nn.ReLU6()
        )
        layers: list[nn.Module] = []
        chs = stem_chs
        for idx, cfg in enumerate(blocks):
            # linear drop-path schedule over blocks, the same rate for bridges and conv path (reference)
            dpr = drop_path_rate * (idx + 1) / len(blocks)
            if cfg.kind == "conv":
                layers.append(ConvBlock(chs, cfg.out_chs, cfg.stride, cfg.exp1, group_num))
            elif cfg.kind == "down":
                layers.append(DnaBlockDown(chs, cfg.out_chs, cfg.stride, cfg.exp1, cfg.exp2, token_dim, group_num, dpr))
            elif cfg.kind == "dna":
                layers.append(DnaBlock(chs, cfg.out_chs, cfg.stride, cfg.exp1, token_dim, group_num, dpr))
            else:
                raise ValueError(f"unknown block kind {cfg.kind!r}")
            chs = cfg.out_chs
        self.features = nn.Sequential(*layers)
        self.num_features = chs
        self.head_hidden_size = head_hidden_size
        self.local_global = MobileToFormer(chs, token_dim, drop_path_rate)
        self.classifier = MergeClassifier(chs, head_hidden_size, num_classes, token_dim, group_num, drop_rate=drop_rate)
        self._init_weights()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)
        name_capture_points(self)

    def _init_weights(self) -> None:
        # the reference's init: He-normal (fan-out) convs, N(0, 0.01) linears, BN to identity
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier.classifier[1]

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        ref = self.classifier.fc[0].weight
        self.classifier.classifier[1] = (
            nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        name_capture_points(self)

    def initial_tokens(self, batch_size: int) -> torch.Tensor:
        return self.tokens.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def forward_trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stem and blocks: the last feature map (B, C, H, W) and the tokens (B, T, Ct)."""
        tokens = self.initial_tokens(x.shape[0])
        x = self.stem(x)
        for block in self.features:
            x, tokens = block(x, tokens)
        return x, tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_trunk(x)[0]

    def forward_head(self, x: torch.Tensor, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final Mobile->Former, then the classifier (which reads token 0)."""
        tokens = self.local_global(x, tokens)
        return self.classifier(x, tokens, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, tokens = self.forward_trunk(x)
        return self.forward_head(x, tokens)


def _blocks(spec: Sequence[tuple[Any, ...]]) -> tuple[BlockCfg, ...]:
    return tuple(BlockCfg(*s) for s in spec)


# Block lists of the reference factories, as (kind, out channels, stride, e1[, e2]). The reference's
# _make_divisible leaves every width unchanged (all are multiples of 4 at width 1.0).
_ARCH: dict[str, dict[str, Any]] = {
    "mobile_former_508m": dict(
        stem_chs=24, token_num=6, token_dim=192, head_hidden_size=1920,
        blocks=_blocks([
            ("conv", 24, 1, 2),
            ("down", 40, 2, 6), ("dna", 40, 1, 3),
            ("down", 72, 2, 6), ("dna", 72, 1, 3),
            ("down", 128, 2, 6), ("dna", 128, 1, 4), ("dna", 176, 1, 6), ("dna", 176, 1, 6),
            ("down", 240, 2, 6), ("dna", 240, 1, 6), ("dna", 240, 1, 6),
        ]),
    ),
    "mobile_former_294m": dict(
        stem_chs=16, token_num=6, token_dim=192, head_hidden_size=1920,
        blocks=_blocks([
            ("conv", 16, 1, 2),
            ("down", 24, 2, 6), ("dna", 24, 1, 4),
            ("down", 48, 2, 6), ("dna", 48, 1, 4),
            ("down", 96, 2, 6), ("dna", 96, 1, 4), ("dna", 128, 1, 6), ("dna", 128, 1, 6),
            ("down", 192, 2, 6), ("dna", 192, 1, 6), ("dna", 192, 1, 6),
        ]),
    ),
    "mobile_former_214m": dict(
        stem_chs=12, token_num=6, token_dim=192, head_hidden_size=1600,
        blocks=_blocks([
            ("conv", 12, 1, 2),
            ("down", 20, 2, 6), ("dna", 20, 1, 3),
            ("down", 40, 2, 6), ("dna", 40, 1, 4),
            ("down", 80, 2, 6), ("dna", 80, 1, 4), ("dna", 112, 1, 6), ("dna", 112, 1, 6),
            ("down", 160, 2, 6), ("dna", 160, 1, 6), ("dna", 160, 1, 6),
        ]),
    ),
    "mobile_former_151m": dict(
        stem_chs=12, token_num=6, token_dim=192, head_hidden_size=1280,
        blocks=_blocks([
            ("conv", 12, 1, 2),
            ("down", 16, 2, 6), ("dna", 16, 1, 3),
            ("down", 32, 2, 6), ("dna", 32, 1, 3),
            ("down", 64, 2, 6), ("dna", 64, 1, 4), ("dna", 88, 1, 6), ("dna", 88, 1, 6),
            ("down", 128, 2, 6), ("dna", 128, 1, 6), ("dna", 128, 1, 6),
        ]),
    ),
    "mobile_former_96m": dict(
        stem_chs=12, token_num=4, token_dim=128, head_hidden_size=1280,
        blocks=_blocks([
            ("conv", 12, 1, 2),
            ("down", 16, 2, 6),
            ("down", 32, 2, 6), ("dna", 32, 1, 3),
            ("down", 64, 2, 6), ("dna", 64, 1, 4), ("dna", 88, 1, 6),
            ("down", 128, 2, 6), ("dna", 128, 1, 6),
        ]),
    ),
}
_BLOCKS_52M = _blocks([
    ("conv", 12, 2, 3), ("dna", 12, 1, 3),
    ("down", 24, 2, 6), ("dna", 24, 1, 3),
    ("down", 48, 2, 6), ("dna", 48, 1, 4), ("dna", 64, 1, 6),
    ("down", 96, 2, 6), ("dna", 96, 1, 6),
])
_ARCH["mobile_former_52m"] = dict(stem_chs=8, token_num=3, token_dim=128, head_hidden_size=1024, blocks=_BLOCKS_52M)
# 26m = 52m with 4-group 1x1 convolutions and channel shuffles.
_ARCH["mobile_former_26m"] = dict(_ARCH["mobile_former_52m"], group_num=4)
# CIFAR-10 (not an official model): the 52m block list with the stem and the first block at stride
# 1 instead of 2, so the total stride is 8 and a 32x32 image ends as a 4x4 map (32 -> 16 -> 8 -> 4
# at the three stride-2 DnaBlock3s); 6 tokens of 128 instead of 3 to give the maps more tokens to
# compare; 10 classes. About 2.5 M parameters.
_ARCH["mobile_former_cifar"] = dict(
    stem_chs=8, stem_stride=1, token_num=6, token_dim=128, head_hidden_size=1024,
    blocks=(BlockCfg("conv", 12, 1, 3), *_BLOCKS_52M[1:]),
)

# Google Drive files of the reference README (each holds {"state_dict": ...}); timm cannot download
# them itself, so load a local copy with pretrained_cfg_overlay=dict(file=path), which unwraps
# "state_dict" on its own.
_WEIGHTS = {
    "mobile_former_508m": "https://drive.google.com/file/d/1bqLIcpbCaxK-Eb4wcxk0iJpFJ1nXfGuF",
    "mobile_former_294m": "https://drive.google.com/file/d/1JBSM7NJ60fN9TgT5sMnbhmbZwrzcBd0r",
    "mobile_former_214m": "https://drive.google.com/file/d/13MOjdIMMBJgqyq_ld-grRhBBHOFU5Ggd",
    "mobile_former_151m": "https://drive.google.com/file/d/1w4QO-zhJ8QI1zGu7iOZ7lXxYJ5G1VXdF",
    "mobile_former_96m": "https://drive.google.com/file/d/1kMbRceswujtliCHKr-nxMFsrkvBrEfrW",
    "mobile_former_52m": "https://drive.google.com/file/d/1ekq_FPl57gjIlYX16Ll0nBuEyB0pjgGt",
    "mobile_former_26m": "https://drive.google.com/file/d/15uWYzx2VWWUjacZQHB56vOHzKxQDlp5O",
}


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "classifier.classifier.1",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        **{name: _cfg(url) for name, url in _WEIGHTS.items()},
        "mobile_former_cifar": _cfg(
            num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0, interpolation="bicubic",
            mean=CIFAR10_MEAN, std=CIFAR10_STD,
        ),
    }
)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    # build_model_with_cfg absorbs pretrained_cfg, pretrained_cfg_overlay and cache_dir
    return build_model_with_cfg(MobileFormer, variant, pretrained, **dict(_ARCH[variant], **kwargs))


@register_model
def mobile_former_508m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    return _create("mobile_former_508m", pretrained, **kwargs)


@register_model
def mobile_former_294m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    return _create("mobile_former_294m", pretrained, **kwargs)


@register_model
def mobile_former_214m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    return _create("mobile_former_214m", pretrained, **kwargs)


@register_model
def mobile_former_151m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    return _create("mobile_former_151m", pretrained, **kwargs)


@register_model
def mobile_former_96m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    return _create("mobile_former_96m", pretrained, **kwargs)


@register_model
def mobile_former_52m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    return _create("mobile_former_52m", pretrained, **kwargs)


@register_model
def mobile_former_26m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    return _create("mobile_former_26m", pretrained, **kwargs)


@register_model
def mobile_former_cifar(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """32x32 CIFAR-10 configuration (not an official model); see ``_ARCH["mobile_former_cifar"]``."""
    return _create("mobile_former_cifar", pretrained, **kwargs)

"""FCViT: "A Close Look at Spatial Modeling: From Attention to Convolution" (arXiv 2212.12552).

A MetaFormer-style convolutional network whose token mixer adds a *query-independent global
context* (GlobalContext) in front of each large-kernel depthwise convolution. Written from the
architecture facts of the official code (ma-xu/FCViT, ``models/fcvit.py``); module and parameter
names follow that code so an official checkpoint loads with ``strict=True``.

Only the configuration every official factory builds is implemented: two GlobalContext +
depthwise-conv mixing steps per token mixer, 8 heads, weighted context with "competition" (max
over two halves of the bottleneck), no spatial/channel attention branches (they are off in all
released models, so their parameters never appear in a checkpoint).

Captured maps (``models.capture``), per GlobalContext module, e.g.
``network.0.1.token_mixer.gc1.similarity``:

* ``similarity``          S   (B, heads, H, W): scaled dot product of each position with the
                              per-head global mean, <x_i^h, g_h> / sqrt(d).
* ``similarity_norm``     S'  (B, heads, H, W): S standardised per image jointly over heads and
                              positions, (S - mean) / (unbiased std + 1e-5).
* ``similarity_rescaled`` S'' (B, heads, H, W): alpha_h * S'_h + beta_h (learned per head).
* ``context``             (B, C, H, W): the dense GlobalContext output S''_{h(c)} * u_c that is
                              added to the mixer input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from models.capture import is_capturing, name_capture_points, record

__all__ = ["FCViT", "GlobalContext"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with a single group: normalises each sample over (C, H, W), as the official code."""

    def __init__(self, num_channels: int) -> None:
        super().__init__(1, num_channels)


class ConvEmbed(nn.Module):
    """Conv -> BatchNorm; the stem (7x7 s4) and the stage downsamplers (3x3 s2) of the official code."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class GlobalContext(nn.Module):
    """Weighted global context with competition (the only variant the released models use).

    Per image and head h (d = C / heads): S_h(i) = <x_i^h, g_h> / sqrt(d) with g the spatial mean;
    S' standardises S jointly over heads and positions (unbiased std, +1e-5 on the std); S''_h =
    alpha_h S'_h + beta_h. The channel vector u = fc2(max(fc1(g)[:C/r], fc1(g)[C/r:])) (official:
    reshape to [B, 2, C/r] and max over dim 1) is modulated per position: out[c, i] = S''_{h(c)}(i) u_c.
    """

    def __init__(self, dim: int, num_heads: int = 8, reduction: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"GlobalContext: dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.eps = eps
        # Official widths: fc1 C -> (2C)//r (two competing halves), fc2 C//r -> C.
        self.fc1 = nn.Linear(dim, 2 * dim // reduction)
        self.fc2 = nn.Linear(dim // reduction, dim)
        self.rescale_weight = nn.Parameter(torch.ones(num_heads))
        self.rescale_bias = nn.Parameter(torch.zeros(num_heads))

    def channel_context(self, gap: torch.Tensor) -> torch.Tensor:
        """u (B, C) from the pooled input (B, C): bottleneck with a max over two competing halves."""
        hidden = self.fc1(gap)
        half = hidden.shape[1] // 2
        return self.fc2(torch.maximum(hidden[:, :half], hidden[:, half:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads, n = self.num_heads, h * w
        gap = x.mean(dim=(2, 3))  # (B, C)
        tokens = x.reshape(b, heads, self.head_dim, n)
        sim = torch.einsum("bhdn,bhd->bhn", tokens, gap.view(b, heads, self.head_dim)) * self.scale
        std, mean = torch.std_mean(sim, dim=(1, 2), keepdim=True)  # joint over heads and positions
        sim_norm = (sim - mean) / (std + self.eps)
        sim_rescaled = sim_norm * self.rescale_weight.view(1, heads, 1) + self.rescale_bias.view(1, heads, 1)
        u = self.channel_context(gap)
        out = (sim_rescaled.unsqueeze(2) * u.view(b, heads, self.head_dim, 1)).reshape(b, c, h, w)
        if is_capturing():
            record(self, "similarity", sim.view(b, heads, h, w))
            record(self, "similarity_norm", sim_norm.view(b, heads, h, w))
            record(self, "similarity_rescaled", sim_rescaled.view(b, heads, h, w))
            record(self, "context", out)
        return out


def _pointwise_bottleneck(dim: int, hidden: int) -> nn.Sequential:
    """1x1 (C -> m) -> GELU -> 1x1 (m -> C); keys ``.0`` and ``.2`` as in the official code."""
    return nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))


class TokenMixer(nn.Module):
    """x += gc1(x); x = GELU(fc1(dw1(x))); x += gc2(x); x = GELU(fc2(dw2(x)))."""

    def __init__(
        self, dim: int, kernel_size: int = 11, num_heads: int = 8, fc_factor: int = 8, fc_min: int = 16
    ) -> None:
        super().__init__()
        hidden = max(dim // fc_factor, fc_min)
        pad = kernel_size // 2
        self.gc1 = GlobalContext(dim, num_heads)
        self.dw1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)
        self.fc1 = _pointwise_bottleneck(dim, hidden)
        self.gc2 = GlobalContext(dim, num_heads)
        self.dw2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)
        self.fc2 = _pointwise_bottleneck(dim, hidden)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gc1(x)
        x = self.act(self.fc1(self.dw1(x)))
        x = x + self.gc2(x)
        return self.act(self.fc2(self.dw2(x)))


class ChannelMixer(nn.Module):
    """1x1 (C -> rC) -> DW 3x3 -> GELU -> 1x1 (rC -> C); no activation before the depthwise conv."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


class FCViTBlock(nn.Module):
    """Pre-norm MetaFormer block with per-channel layer scale on both residual branches."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        kernel_size: int = 11,
        num_heads: int = 8,
        drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = GroupNorm1(dim)
        self.token_mixer = TokenMixer(dim, kernel_size, num_heads)
        self.norm2 = GroupNorm1(dim)
        self.channel_mixer = ChannelMixer(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale_init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1.view(1, -1, 1, 1) * self.token_mixer(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2.view(1, -1, 1, 1) * self.channel_mixer(self.norm2(x)))


class FCViT(nn.Module):
    """FCViT classifier. ``network`` alternates stages (0/2/4/6) and downsamplers (1/3/5) as officially.

    ``forward_features`` returns the last stage's map *before* the final GroupNorm (timm's MetaFormer
    convention); ``forward_head`` applies GroupNorm -> spatial mean -> Linear like the official forward.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 5, 2),
        dims: Sequence[int] = (32, 64, 160, 320),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        num_classes: int = 1000,
        in_chans: int = 3,
        kernel_size: int = 11,
        num_heads: int = 8,
        stem_kernel_size: int = 7,
        stem_stride: int = 4,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-5,
        global_pool: str = "avg",
        **kwargs: Any,  # other timm builder kwargs (e.g. features-related) are accepted and unused
    ) -> None:
        super().__init__()
        if global_pool != "avg":
            raise ValueError("FCViT only supports global_pool='avg'")
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.patch_embed = ConvEmbed(in_chans, dims[0], stem_kernel_size, stem_stride)

        total = sum(depths)
        network: list[nn.Module] = []
        self.feature_info: list[dict[str, Any]] = []
        reduction = stem_stride
        start = 0
        for i, depth in enumerate(depths):
            # Official stochastic depth: linear in the global block index, reaching the rate at the last block.
            rates = [drop_path_rate * (start + j) / max(total - 1, 1) for j in range(depth)]
            blocks = [
                FCViTBlock(dims[i], mlp_ratios[i], kernel_size, num_heads, proj_drop_rate, r, layer_scale_init_value)
                for r in rates
            ]
            network.append(nn.Sequential(*blocks))
            stage_name = f"network.{len(network) - 1}"
            self.feature_info.append({"num_chs": dims[i], "reduction": reduction, "module": stage_name})
            start += depth
            if i < len(depths) - 1:
                network.append(ConvEmbed(dims[i], dims[i + 1], 3, 2))
                reduction *= 2
        self.network = nn.ModuleList(network)
        self.norm = GroupNorm1(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        name_capture_points(self)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Official init: convs N(0, sqrt(2 / fan_out)) with fan_out = k*k*out/groups; linears trunc-normal(0.02).
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != "avg":
            raise ValueError("FCViT only supports global_pool='avg'")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for module in self.network:
            x = module(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x).mean(dim=(-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_WEIGHTS = {
    "fcvit_tiny": "https://drive.google.com/drive/folders/1YSa8tkXkUQT94mgo-L7q4pv5KiHRTAaR",
    "fcvit_b12": "https://drive.google.com/drive/folders/1QuyalIGhJeD2pxcVxR0_gJNrk2mZ8WEb",
    "fcvit_b24": "https://drive.google.com/drive/folders/1II2v1rhNe9sgLJtoSR-cgSh2mpPQMt4t",
    "fcvit_b48": "https://drive.google.com/drive/folders/16joP1cQwbx4oICL-WbPC1SqGNoc4-NZm",
}


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "origin_url": "https://github.com/ma-xu/FCViT",
        "paper_ids": "arXiv:2212.12552",
        **kwargs,
    }


# The official weights are Google Drive *folders* (file names unconfirmed): load them locally with
# pretrained_cfg_overlay=dict(file=path); timm then unwraps state_dict_ema / state_dict itself.
default_cfgs = generate_default_cfgs(
    {
        "fcvit_tiny": _cfg(_WEIGHTS["fcvit_tiny"], crop_pct=0.9),
        "fcvit_b12": _cfg(_WEIGHTS["fcvit_b12"], crop_pct=0.9),
        "fcvit_b24": _cfg(_WEIGHTS["fcvit_b24"], crop_pct=0.95),
        "fcvit_b48": _cfg(_WEIGHTS["fcvit_b48"], crop_pct=0.95),
        "fcvit_cifar": _cfg(
            num_classes=10,
            input_size=(3, 32, 32),
            pool_size=(4, 4),
            crop_pct=1.0,
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            origin_url="",
            notes=("HybridLens small-input config, trained here on CIFAR-10",),
        ),
    }
)


def _create_fcvit(variant: str, pretrained: bool = False, **kwargs: Any) -> FCViT:
    return build_model_with_cfg(FCViT, variant, pretrained, **kwargs)


@register_model
def fcvit_tiny(pretrained: bool = False, **kwargs: Any) -> FCViT:
    args = {"depths": (3, 3, 5, 2), "dims": (32, 64, 160, 320), "mlp_ratios": (8, 8, 4, 4)}
    return _create_fcvit("fcvit_tiny", pretrained, **dict(args, **kwargs))


@register_model
def fcvit_b12(pretrained: bool = False, **kwargs: Any) -> FCViT:
    args = {"depths": (2, 2, 6, 2), "dims": (64, 128, 320, 512), "mlp_ratios": (8, 8, 4, 4)}
    return _create_fcvit("fcvit_b12", pretrained, **dict(args, **kwargs))


@register_model
def fcvit_b24(pretrained: bool = False, **kwargs: Any) -> FCViT:
    args = {"depths": (4, 4, 12, 4), "dims": (64, 128, 320, 512), "mlp_ratios": (8, 8, 4, 4)}
    return _create_fcvit("fcvit_b24", pretrained, **dict(args, **kwargs))


@register_model
def fcvit_b48(pretrained: bool = False, **kwargs: Any) -> FCViT:
    args = {"depths": (8, 8, 24, 8), "dims": (64, 128, 320, 512), "mlp_ratios": (8, 8, 4, 4)}
    return _create_fcvit("fcvit_b48", pretrained, **dict(args, **kwargs))


@register_model
def fcvit_cifar(pretrained: bool = False, **kwargs: Any) -> FCViT:
    """32x32 CIFAR-10 configuration (not an official model).

    Changes from fcvit_tiny, all for the 8x smaller input: stem Conv3x3 stride 1 (instead of 7x7
    stride 4) so the stages see 32/16/8/4 px maps rather than 8/4/2/1; depthwise kernels 7x7
    (11x11 would be mostly zero padding on 8x8 and 4x4 maps); depths (2, 2, 4, 2) and widths
    (32, 64, 128, 256) to keep FLOPs and parameters (~2.5 M) small. GlobalContext is unchanged.
    """
    args = {
        "depths": (2, 2, 4, 2),
        "dims": (32, 64, 128, 256),
        "mlp_ratios": (8, 8, 4, 4),
        "kernel_size": 7,
        "stem_kernel_size": 3,
        "stem_stride": 1,
        "num_classes": 10,
    }
    return _create_fcvit("fcvit_cifar", pretrained, **dict(args, **kwargs))

"""Conv2Former (Hou et al., TPAMI 2024): convolutional modulation instead of self-attention.

Written from the facts of the official code (HVision-NKU/Conv2Former, ``models/conv2former.py``);
module and parameter names equal the official checkpoint's, so its ``state_dict`` loads strictly.

ConvMod (official class name ``SpatialAttention``, attribute ``attn``)::

    y = LN(x);  A = DW_k(GELU(1x1(y)));  V = 1x1(y);  out = 1x1(A * V)

``A`` is an unnormalised (B, C, H, W) modulation map: there is no attention matrix. While a thread
captures (``models.capture.capturing``) every block records ``stages.S.B.attn.modulation`` (A, after
the large-kernel depthwise conv) and ``stages.S.B.attn.value`` (V), both (B, C, H, W).

Where the paper and the code differ, the code is followed:
  * the stem is Conv3x3 s2 -> GELU -> BN -> Conv3x3 -> GELU -> BN -> Conv2x2 s2 (no biases);
  * the head is Conv1x1(-> 1280) -> GELU -> LN -> global mean -> ``pred`` Linear;
  * kernel sizes are those of the current official code: N uses k = 7 (k = 11 before the
    2025-01-02 commit, 15,241,672 parameters), T/S/B/L use 11, ``b_22k`` uses 7.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from models.capture import name_capture_points, record

__all__ = ["Conv2Former", "Conv2FormerBlock", "ConvMlp", "ConvMod", "LayerNorm2d"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of (B, C, H, W); keys ``weight``/``bias`` as the official one."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same maths as the official mean/biased-variance formula; F.layer_norm is faster and fp16-safe.
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvMod(nn.Module):
    """Convolutional modulation: ``proj(A * V)`` with ``A = att(norm(x))`` and ``V = v(norm(x))``."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        # att.0 / att.1 / att.2 index the official Sequential (1x1, GELU, depthwise k x k).
        self.att = nn.Sequential(
            nn.Conv2d(dim, dim, 1),
            nn.GELU(),
            nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim),
        )
        self.v = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        a = self.att(y)
        v = self.v(y)
        # Capture is an eager-mode tool. Skipping it while torch.compile traces avoids a graph break per
        # block (ContextVar access); with the breaks, dynamo hit its recompile limit on the per-block
        # drop-path rates and fell back to eager (seen training the CIFAR config on an H100).
        if not torch.compiler.is_compiling():
            record(self, "modulation", a)
            record(self, "value", v)
        return self.proj(a * v)


class ConvMlp(nn.Module):
    """LN -> 1x1 (x ratio) -> GELU -> z + GELU(DW3x3(z)) -> 1x1, as the official ``MLP``."""

    def __init__(self, dim: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        hidden = dim * mlp_ratio
        self.norm = LayerNorm2d(dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.pos = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(self.norm(x)))
        x = x + self.act(self.pos(x))
        return self.fc2(x)


class Conv2FormerBlock(nn.Module):
    """x <- x + ls1 * ConvMod(x); x <- x + ls2 * MLP(x); layer scales start at 1e-6."""

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        mlp_ratio: int = 4,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
    ) -> None:
        super().__init__()
        self.attn = ConvMod(dim, kernel_size)
        self.mlp = ConvMlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        # Plain (C,) vectors: the official keys are ``layer_scale_1`` / ``layer_scale_2``.
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(x))
        x = x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(x))
        return x


class Conv2Former(nn.Module):
    """Four-stage Conv2Former; ``forward_features`` returns the last stage map (B, dims[-1], H/32, W/32).

    The official ``forward_features`` also ran the 1x1 head conv and the pooling; here those live in
    ``forward_head`` (timm convention), which keeps the same keys and the same logits.

    ``stem_stride`` is the stride of the first stem conv (2 in every official model, so the stem
    downsamples by 4); the CIFAR config uses 1 (stem downsamples by 2) without changing any shape.
    """

    def __init__(
        self,
        kernel_size: int = 7,
        depths: tuple[int, ...] = (2, 2, 8, 2),
        dims: tuple[int, ...] = (64, 128, 256, 512),
        mlp_ratio: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        head_hidden_size: int = 1280,
        stem_stride: int = 2,
        layer_scale_init_value: float = 1e-6,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.kernel_size = kernel_size
        self.num_features = dims[-1]
        self.head_hidden_size = head_hidden_size
        self.drop_rate = drop_rate

        half = dims[0] // 2
        # downsample_layers.0 is the stem; indices 1/4 are GELUs, so the keys sit at 0, 2, 3, 5, 6.
        stem = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, stride=stem_stride, padding=1, bias=False),
            nn.GELU(),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 3, padding=1, bias=False),
            nn.GELU(),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, dims[0], 2, stride=2, bias=False),
        )
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
            )

        # Linear stochastic-depth schedule over all blocks (plain floats: works on the meta device too).
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        cur = 0
        for dim, depth in zip(dims, depths, strict=True):
            self.stages.append(
                nn.Sequential(
                    *[
                        Conv2FormerBlock(dim, kernel_size, mlp_ratio, rates[cur + j], layer_scale_init_value)
                        for j in range(depth)
                    ]
                )
            )
            cur += depth

        # Informational (channels/stride per stage). timm's features_only wrappers are not supported:
        # the stem/downsamplers and stages live in two ModuleLists, not in execution order.
        stem_reduction = 2 * stem_stride
        self.feature_info = [
            {"num_chs": dims[i], "reduction": stem_reduction * 2**i, "module": f"stages.{i}"}
            for i in range(len(dims))
        ]
        self.head = nn.Sequential(
            nn.Conv2d(dims[-1], head_hidden_size, 1),
            nn.GELU(),
            LayerNorm2d(head_hidden_size),
        )
        self.head_drop = nn.Dropout(drop_rate)
        self.pred = nn.Linear(head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        name_capture_points(self)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Official init: truncated normal (std 0.02) for conv/linear weights, zero biases.
        # Meta tensors hold no data (used to count parameters of the big variants): nothing to draw.
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.is_meta:
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.pred

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.pred = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        # The new head was built after name_capture_points: give it its path too.
        name_capture_points(self.pred, prefix="pred")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head(x)
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.pred(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    # Normalisation is ambiguous: the README says ImageNet mean/std, but the official code sets
    # ``default_cfg = timm.models.vision_transformer._cfg()`` (mean/std 0.5, bicubic, crop 0.9) and its
    # train/validate scripts use that cfg unless overridden. We follow the code; check both on
    # labelled images before trusting accuracies.
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "downsample_layers.0.0",
        "classifier": "pred",
        "license": "mit",
        **kwargs,
    }


# The official weights are Baidu Pan share pages (2024-12-31), not direct downloads: timm cannot fetch
# them. Download by hand and load with ``pretrained_cfg_overlay=dict(file=path)``. The kernel of the
# 22k S/L checkpoints is not confirmed: check ``stages.0.0.attn.att.2.weight`` [C, 1, k, k].
default_cfgs = generate_default_cfgs(
    {
        "conv2former_n.in1k": _cfg(url="https://pan.baidu.com/s/1sgO-UhF27UQrGtfKJzck3A?pwd=6ku9"),
        "conv2former_t.in1k": _cfg(url="https://pan.baidu.com/s/1Rfsi5p5usr3UE46jigtlcg?pwd=gwq4"),
        "conv2former_s.in1k": _cfg(url="https://pan.baidu.com/s/16Lu1LcQkOoSQXnZVGxGPxg?pwd=6z6m"),
        "conv2former_s.in22k_ft_in1k": _cfg(url="https://pan.baidu.com/s/1uMBF5xSvdWa5TCjQ_jlK4g?pwd=1iij"),
        "conv2former_b.in1k": _cfg(url="https://pan.baidu.com/s/1q5V1J3jzAoKQis-hx6rTVg?pwd=bdgj"),
        "conv2former_b_22k.in22k_ft_in1k": _cfg(url="https://pan.baidu.com/s/1rkt3NhYQhPPOD5kj67uZCw?pwd=gbj9"),
        "conv2former_l.in22k_ft_in1k": _cfg(url="https://pan.baidu.com/s/1_YYQ_rY9QRkq-m2lv23GPg?pwd=44os"),
        "conv2former_l.in22k_ft_in1k_384": _cfg(
            url="https://pan.baidu.com/s/1vyBaA4UGUX_qlS-ugxpTSQ?pwd=gu0m",
            input_size=(3, 384, 384),
            pool_size=(12, 12),
            crop_pct=1.0,
        ),
        "conv2former_cifar": {
            "url": "",
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "pool_size": (2, 2),
            "crop_pct": 1.0,
            "interpolation": "bicubic",
            "mean": (0.4914, 0.4822, 0.4465),
            "std": (0.2470, 0.2435, 0.2616),
            "first_conv": "downsample_layers.0.0",
            "classifier": "pred",
        },
    }
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> Conv2Former:
    # build_model_with_cfg consumes timm's pretrained_cfg / pretrained_cfg_overlay / cache_dir kwargs.
    return build_model_with_cfg(Conv2Former, variant, pretrained, **kwargs)


def _args(kernel_size: int, dims: tuple[int, ...], depths: tuple[int, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    # Caller kwargs win, so ``kernel_size=11`` (or 7) overrides the variant's kernel.
    return {"kernel_size": kernel_size, "dims": dims, "depths": depths, **kwargs}


@register_model
def conv2former_n(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    return _create("conv2former_n", pretrained, **_args(7, (64, 128, 256, 512), (2, 2, 8, 2), kwargs))


@register_model
def conv2former_t(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    return _create("conv2former_t", pretrained, **_args(11, (72, 144, 288, 576), (3, 3, 12, 3), kwargs))


@register_model
def conv2former_s(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    return _create("conv2former_s", pretrained, **_args(11, (72, 144, 288, 576), (4, 4, 32, 4), kwargs))


@register_model
def conv2former_b(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    return _create("conv2former_b", pretrained, **_args(11, (96, 192, 384, 768), (4, 4, 34, 4), kwargs))


@register_model
def conv2former_b_22k(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    # Same widths/depths as B, but the official 22k model uses k = 7.
    return _create("conv2former_b_22k", pretrained, **_args(7, (96, 192, 384, 768), (4, 4, 34, 4), kwargs))


@register_model
def conv2former_l(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    return _create("conv2former_l", pretrained, **_args(11, (128, 256, 512, 1024), (4, 4, 48, 4), kwargs))


@register_model
def conv2former_cifar(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    """CIFAR-10 (32x32, 10 classes) config, not an official model.

    The first stem conv has stride 1 instead of 2, so the stem downsamples by 2 (not 4) and the stages
    see 16/8/4/2 pixels at 32x32 input (7x7 kernels still cover most of stage 0). Layer names and
    structure are unchanged; widths (48, 96, 160, 256) / depths (2, 2, 6, 2), k = 7, head hidden 512
    (3,960,978 parameters, about 8 MB in fp16).
    """
    defaults: dict[str, Any] = {
        "num_classes": 10,
        "stem_stride": 1,
        "head_hidden_size": 512,
        "drop_path_rate": 0.1,
    }
    return _create(
        "conv2former_cifar", pretrained, **_args(7, (48, 96, 160, 256), (2, 2, 6, 2), {**defaults, **kwargs})
    )

"""ViT family: CIFAR-10 demo configs (plain, DeiT-distilled, CNN teacher) and capture for timm ViTs.

The architectures are timm's own (``VisionTransformer``, ``VisionTransformerDistilled``,
``ResNet``), so hub weights and bundled weights share one code path. What this file adds is
:func:`forward_with_attention`, the capture-aware forward of any timm ViT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from models.capture import capture_name, name_capture_points, record, wants

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def cifar_cfg(**kwargs: object) -> dict:
    """pretrained_cfg shared by every 32x32 CIFAR-10 demo model in the zoo."""
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": CIFAR_MEAN, "std": CIFAR_STD, **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "vit_cifar.hybridlens": cifar_cfg(first_conv="patch_embed.proj", classifier="head"),
    "deit_cifar_distilled.hybridlens": cifar_cfg(
        first_conv="patch_embed.proj", classifier=("head", "head_dist")
    ),
    "resnet_cifar.hybridlens": cifar_cfg(first_conv="conv1", classifier="fc", fixed_input_size=False),
})

# 64 patch tokens (patch 4 on 32x32), 6 heads so the head pickers show something, narrow MLP
# to keep training to minutes on one GPU.
_CIFAR_VIT_ARGS = dict(
    img_size=32, patch_size=4, embed_dim=192, depth=8, num_heads=6, mlp_ratio=2.0, num_classes=10
)


def _build_vit(cls: type, variant: str, pretrained: bool, **kwargs: object) -> nn.Module:
    args = {**_CIFAR_VIT_ARGS, **kwargs}
    model = build_model_with_cfg(cls, variant, pretrained, **args)
    return name_capture_points(model)


@register_model
def vit_cifar(pretrained: bool = False, **kwargs: object) -> VisionTransformer:
    """ViT for 32x32 CIFAR-10: patch 4 (8x8 = 64 patch tokens + CLS), dim 192, depth 8, 6 heads."""
    return _build_vit(VisionTransformer, "vit_cifar", pretrained, **kwargs)


@register_model
def deit_cifar_distilled(pretrained: bool = False, **kwargs: object) -> VisionTransformerDistilled:
    """The same ViT with DeiT's distillation token (2 prefix tokens), for the distillation study."""
    return _build_vit(VisionTransformerDistilled, "deit_cifar_distilled", pretrained, **kwargs)


@register_model
def resnet_cifar(pretrained: bool = False, **kwargs: object) -> ResNet:
    """ResNet-10 (one BasicBlock per stage) with the CIFAR stem (3x3 stride 1, no max-pool): the
    distillation teacher, small enough to ship (fp16 under 10 MB) and to train in minutes."""
    args = {"block": BasicBlock, "layers": (1, 1, 1, 1), "num_classes": 10, **kwargs}
    model = build_model_with_cfg(ResNet, "resnet_cifar", pretrained, **args)
    # timm's ResNet has no switch for the CIFAR stem; swap the modules before any weight loads.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return name_capture_points(model)


def is_timm_vit(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def _attention_forward(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """timm ``Attention.forward`` with the softmax map made explicit and recorded.

    Written out here (rather than hooked) so the map reaches only the calling thread's recorder;
    it follows timm 1.0's ``Attention.forward`` step by step and is checked against
    ``timm.utils.AttentionExtract`` in the tests.
    """
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if wants(attn, "attn"):
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        record(attn, "attn", weights)
        out = attn.attn_drop(weights) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _block_forward(block: Block, x: torch.Tensor) -> torch.Tensor:
    x = x + block.drop_path1(block.ls1(_attention_forward(block.attn, block.norm1(x))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def check_capturable_vit(model: nn.Module) -> None:
    """Raise a clear error for ViT variants whose blocks this forward does not reproduce."""
    for index, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise TypeError(
                f"Block {index} of {type(model).__name__} is {type(block).__name__} with "
                f"{type(block.attn).__name__}; attention capture supports timm's standard "
                "Block/Attention ViTs (ViT, DeiT, DeiT-distilled, register ViTs)."
            )


def forward_with_attention(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The model's forward, with each block's attention recorded as ``blocks.{i}.attn.attn``.

    Uses the model's own patch embedding, position embedding and head, so prefix tokens (CLS,
    distillation, registers) and the distilled head average behave exactly as in ``model(x)``.
    """
    check_capturable_vit(model)
    if not capture_name(model.blocks[0].attn).startswith("blocks."):
        name_capture_points(model)  # a hub model built by timm directly
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for block in model.blocks:
        x = _block_forward(block, x)
    x = model.norm(x)
    return model.forward_head(x)

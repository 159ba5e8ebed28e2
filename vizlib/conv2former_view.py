"""Conv2Former modulation: per block A, V and A⊙V maps, and the effective kernel footprint.

Conv2Former (Hou et al., TPAMI 2024) computes ``out = proj(A ⊙ V)`` with ``A = DW_k(GELU(1x1(LN x)))``
and ``V = 1x1(LN x)``: the large-kernel modulation A reweights the values per position like attention,
but A is a (C, H, W) map, never an N x N matrix.

* Maps: per block, mean |A|, |V| and |A⊙V| over groups of consecutive channels (``torch.tensor_split``,
  so any width works), each an (h, w) map on the block's grid.
* Footprint: the gradient receptive field of the centre output of the last block of each stage
  (METHODS.md section 7 per block: s = Σ_c ReLU(out[c, centre]), g = ReLU(∂s/∂x) summed over RGB, on
  this image), reported as the side of the centred square holding t of the gradient mass. It is
  measured for the model itself and for two randomly initialised copies with k = 7 and k = 11 (same
  seed, same widths). The official layer-scale init (1e-6) makes an untrained block the identity to
  within 1e-6, so both kernels would show the stem's field alone; the random copies therefore use
  layer scale 1, and are labelled "random init".
* ViT for comparison: the last-layer attention of the centre query patch as a distribution over input
  pixels, measured with the same square-mass and distance functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from models.conv2former import Conv2Former, LayerNorm2d
from vizlib import metrics
from vizlib.attention import AttentionAnalysis
from vizlib.capture import capture_maps

GROUPS = 8
THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
KERNEL_SIZES = (7, 11)
SEED = 0
RANDOM_LAYER_SCALE = 1.0
# Two random copies of Conv2Former-L would hold 1.6 GB and take minutes on a CPU: above this size only
# the model's own footprint is measured.
RANDOM_COPY_MAX_PARAMS = 30_000_000
KINDS: dict[str, str] = {
    "modulation": "|A| modulation (after the k×k depthwise conv)",
    "value": "|V| value",
    "product": "|A⊙V| modulated value",
}
ATTN_SUFFIX = ".attn"


@dataclass
class ModulationMaps:
    """One block's maps: mean |.| over each channel group, (groups, h, w)."""

    name: str  # stages.S.B
    stage: int  # 0-based
    index: int  # 0-based block in its stage
    grid: tuple[int, int]
    group_sizes: list[int]
    modulation: torch.Tensor
    value: torch.Tensor
    product: torch.Tensor
    mean_abs: dict[str, float] = field(default_factory=dict)  # kind -> mean over channels and positions
    spatial_cv: dict[str, float] = field(default_factory=dict)  # kind -> std/mean over positions (all channels)
    kernel: torch.Tensor | None = None  # (k, k) mean |w| of the depthwise kernel, normalised to sum 1
    kernel_side: dict[float, int] = field(default_factory=dict)  # t -> side holding t of |w|

    @property
    def label(self) -> str:
        return f"stage {self.stage + 1} · block {self.index + 1}"

    def maps(self, kind: str) -> torch.Tensor:
        if kind not in KINDS:
            raise ValueError(f"unknown map kind {kind!r}; choose one of {list(KINDS)}")
        return getattr(self, kind)

    def channel_mean(self, kind: str) -> torch.Tensor:
        """(h, w) mean |.| over all channels: the group means weighted by group size."""
        sizes = torch.tensor(self.group_sizes, dtype=torch.float32).view(-1, 1, 1)
        return (self.maps(kind) * sizes).sum(0) / sizes.sum()


@dataclass
class Footprint:
    """Where the centre output of a block (or a ViT query) draws from, over input pixels."""

    label: str
    kernel_size: int  # 0 for a ViT
    trained: bool
    stage: int  # 0-based; -1 for a ViT
    block: str
    weights: torch.Tensor  # (H, W) non-negative, sums to 1 (all zero if the gradient vanished)
    centre: tuple[float, float]  # input pixels (y, x) of the output position / query patch centre
    side: dict[float, int] = field(default_factory=dict)  # t -> side 2i+1 (clipped at the border)
    area_ratio: dict[float, float] = field(default_factory=dict)  # t -> clipped square pixels / (H·W)
    mean_distance: float = float("nan")  # pixels from the centre, weighted by the footprint

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kernel_size": self.kernel_size,
            "trained": self.trained,
            "stage": self.stage,
            "block": self.block,
            "centre": list(self.centre),
            "side": {str(t): s for t, s in self.side.items()},
            "area_ratio": {str(t): _json_float(r) for t, r in self.area_ratio.items()},
            "mean_distance_px": _json_float(self.mean_distance),
        }


@dataclass
class Conv2FormerAnalysis:
    """All blocks' modulation maps and the per-stage footprints of one image."""

    logits: torch.Tensor
    input_size: tuple[int, int]
    kernel_size: int
    groups: int
    blocks: list[ModulationMaps]
    footprints: list[Footprint]  # per stage: trained model, then random init k = 7, 11

    def block(self, name: str) -> ModulationMaps:
        for maps in self.blocks:
            if maps.name == name:
                return maps
        raise KeyError(f"no Conv2Former block {name}")

    @property
    def stages(self) -> list[int]:
        return sorted({f.stage for f in self.footprints})

    def stage_footprints(self, stage: int) -> list[Footprint]:
        return [f for f in self.footprints if f.stage == stage]

    def block_table(self) -> list[dict[str, float | int | str]]:
        rows: list[dict[str, float | int | str]] = []
        for maps in self.blocks:
            row: dict[str, float | int | str] = {"block": maps.name, "grid": f"{maps.grid[0]}x{maps.grid[1]}"}
            row.update({f"mean |{k}|": v for k, v in maps.mean_abs.items()})
            row.update({f"spatial CV {k}": v for k, v in maps.spatial_cv.items()})
            row.update({f"kernel side {t:g}": s for t, s in maps.kernel_side.items()})
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (the CLI payload without the ViT side)."""
        blocks = [{
            "name": m.name,
            "stage": m.stage,
            "grid": list(m.grid),
            "group_sizes": m.group_sizes,
            "mean_abs": m.mean_abs,
            "spatial_cv": {k: _json_float(v) for k, v in m.spatial_cv.items()},
            "kernel_side": {str(t): s for t, s in m.kernel_side.items()},
        } for m in self.blocks]
        return {
            "input_size": list(self.input_size),
            "kernel_size": self.kernel_size,
            "groups": self.groups,
            "blocks": blocks,
            "footprints": [f.summary() for f in self.footprints],
        }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


# --- maps -------------------------------------------------------------------------------------------


def group_means(values: torch.Tensor, groups: int) -> tuple[torch.Tensor, list[int]]:
    """(C, h, w) -> (groups, h, w) mean |.| over consecutive channel groups, and the group sizes."""
    chunks = torch.tensor_split(values.abs().float(), min(groups, values.shape[0]), dim=0)
    return torch.stack([c.mean(0) for c in chunks]), [int(c.shape[0]) for c in chunks]


def spatial_cv(values: torch.Tensor) -> float:
    """Coefficient of variation over positions of a non-negative (h, w) map (0 = flat)."""
    mean = float(values.mean())
    return float(values.std()) / mean if mean > 0 and values.numel() > 1 else float("nan")


def kernel_profile(conv: nn.Conv2d) -> torch.Tensor:
    """(k, k) mean |w| over channels of a depthwise kernel, normalised to sum 1."""
    weights = conv.weight.detach().abs().float().mean(dim=(0, 1))
    return weights / weights.sum().clamp_min(1e-12)


def _block_maps(model: Conv2Former, name: str, a: torch.Tensor, v: torch.Tensor, groups: int) -> ModulationMaps:
    _, stage, index = name.split(".")
    product = a * v
    kinds = {"modulation": a[0], "value": v[0], "product": product[0]}
    grouped = {kind: group_means(values, groups) for kind, values in kinds.items()}
    kernel = kernel_profile(model.get_submodule(name).attn.att[2])
    maps = ModulationMaps(
        name=name, stage=int(stage), index=int(index), grid=(int(a.shape[-2]), int(a.shape[-1])),
        group_sizes=grouped["modulation"][1],
        modulation=grouped["modulation"][0], value=grouped["value"][0], product=grouped["product"][0],
        mean_abs={kind: float(values.abs().float().mean()) for kind, values in kinds.items()},
        kernel=kernel,
        kernel_side=square_sides(kernel, _centre_pixel(kernel.shape)),
    )
    maps.spatial_cv = {kind: spatial_cv(maps.channel_mean(kind)) for kind in KINDS}
    return maps


# --- footprints -------------------------------------------------------------------------------------


def _centre_pixel(shape: Sequence[int]) -> tuple[float, float]:
    return (int(shape[0]) / 2, int(shape[1]) / 2)


def square_sides(weights: torch.Tensor, centre: tuple[float, float],
                 thresholds: Sequence[float] = THRESHOLDS) -> dict[float, int]:
    """For each t, the side 2i+1 of the smallest square centred on the pixel under ``centre`` (clipped
    to the map) holding at least t of the total mass (METHODS.md section 7); 0 for an all-zero map."""
    total = float(weights.sum())
    height, width = weights.shape
    cy, cx = min(int(centre[0]), height - 1), min(int(centre[1]), width - 1)
    largest = max(cy, height - 1 - cy, cx, width - 1 - cx)
    inside = [float(weights[max(cy - i, 0):cy + i + 1, max(cx - i, 0):cx + i + 1].sum()) for i in range(largest + 1)]
    sides: dict[float, int] = {}
    for t in thresholds:
        if total <= 0:
            sides[float(t)] = 0
            continue
        i = next((i for i, mass in enumerate(inside) if mass >= t * total * (1 - 1e-9)), largest)
        sides[float(t)] = 2 * i + 1
    return sides


def mean_distance(weights: torch.Tensor, centre: tuple[float, float]) -> float:
    """Σ_j w_j ‖p_j − centre‖ / Σ w over pixel centres p_j = (y + 0.5, x + 0.5)."""
    total = float(weights.sum())
    if total <= 0:
        return float("nan")
    ys = torch.arange(weights.shape[0], dtype=torch.float64) + 0.5 - centre[0]
    xs = torch.arange(weights.shape[1], dtype=torch.float64) + 0.5 - centre[1]
    distance = (ys[:, None] ** 2 + xs[None, :] ** 2).sqrt()
    return float((weights.double() * distance).sum() / total)


def make_footprint(label: str, kernel_size: int, trained: bool, stage: int, block: str,
                   weights: torch.Tensor, centre: tuple[float, float]) -> Footprint:
    total = float(weights.sum())
    weights = (weights / total if total > 0 else torch.zeros_like(weights)).float()
    side = square_sides(weights, centre)
    area = {t: (clipped_area(s, centre, weights.shape) if s else float("nan")) for t, s in side.items()}
    return Footprint(label, kernel_size, trained, stage, block, weights, centre, side, area,
                     mean_distance(weights, centre))


def clipped_area(side: int, centre: tuple[float, float], shape: Sequence[int]) -> float:
    """Fraction of the image covered by the square of ``side`` around ``centre`` once clipped to it."""
    height, width = int(shape[0]), int(shape[1])
    cy, cx, i = min(int(centre[0]), height - 1), min(int(centre[1]), width - 1), side // 2
    rows = min(cy + i + 1, height) - max(cy - i, 0)
    cols = min(cx + i + 1, width) - max(cx - i, 0)
    return rows * cols / (height * width)


def stage_outputs(model: Conv2Former, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of the last block of every stage, run module by module (no hooks on a shared model)."""
    outputs = []
    for downsample, stage in zip(model.downsample_layers, model.stages, strict=True):
        x = stage(downsample(x))
        outputs.append(x)
    return outputs


def gradient_fields(model: Conv2Former, x: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, int], tuple[int, int]]]:
    """Per stage: (ReLU(∂s/∂x) summed over RGB (H, W), output grid, centre cell), s = Σ_c ReLU(out[c, centre])."""
    image = x.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        outputs = stage_outputs(model, image)
        fields = []
        for index, out in enumerate(outputs):
            h, w = out.shape[-2:]
            centre = (h // 2, w // 2)
            score = torch.relu(out[0, :, centre[0], centre[1]]).sum()
            (grad,) = torch.autograd.grad(score, image, retain_graph=index < len(outputs) - 1, allow_unused=True)
            g = torch.zeros_like(image[0, 0]) if grad is None else torch.relu(grad[0]).sum(0)
            fields.append((torch.nan_to_num(g.detach()), (int(h), int(w)), centre))
    return fields


def architecture(model: Conv2Former) -> tuple[Any, ...]:
    """What a random copy needs: (depths, dims, mlp_ratio, in_chans, stem_stride, head_hidden_size)."""
    dims = tuple(int(stage[0].attn.v.in_channels) for stage in model.stages)
    depths = tuple(len(stage) for stage in model.stages)
    first = model.stages[0][0]
    mlp_ratio = int(first.mlp.fc1.out_channels // first.mlp.fc1.in_channels)
    stem = model.downsample_layers[0][0]
    return depths, dims, mlp_ratio, int(stem.in_channels), int(stem.stride[0]), int(model.head_hidden_size)


@lru_cache(maxsize=2)  # the k = 7 / 11 pair of the architecture in use
def random_copy(arch: tuple[Any, ...], kernel_size: int, seed: int = SEED) -> Conv2Former:
    """A Conv2Former with ``arch`` and ``kernel_size``, initialised from its own generator (the global RNG
    is shared with other sessions), layer scale RANDOM_LAYER_SCALE. Cached: it never changes."""
    depths, dims, mlp_ratio, in_chans, stem_stride, head_hidden = arch
    model = Conv2Former(kernel_size=kernel_size, depths=depths, dims=dims, mlp_ratio=mlp_ratio, in_chans=in_chans,
                        num_classes=0, head_hidden_size=head_hidden, stem_stride=stem_stride)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)  # the official init
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.BatchNorm2d, LayerNorm2d)):
                module.weight.fill_(1.0)
                module.bias.zero_()
        for name, parameter in model.named_parameters():
            if name.endswith(("layer_scale_1", "layer_scale_2")):
                parameter.fill_(RANDOM_LAYER_SCALE)
    return model.eval().requires_grad_(False)


def footprints(model: Conv2Former, x: torch.Tensor, kernel_sizes: Sequence[int] = KERNEL_SIZES,
               seed: int = SEED) -> list[Footprint]:
    """Per stage: the model's own footprint, then a random-init copy for each kernel size (none for models
    above RANDOM_COPY_MAX_PARAMS)."""
    variants: list[tuple[str, int, bool, Conv2Former]] = [
        (f"this model (k={model.kernel_size})", int(model.kernel_size), True, model)]
    if sum(p.numel() for p in model.parameters()) <= RANDOM_COPY_MAX_PARAMS:
        arch = architecture(model)
        variants += [(f"random init k={k}", int(k), False, random_copy(arch, int(k), seed)) for k in kernel_sizes]
    size = (int(x.shape[-2]), int(x.shape[-1]))
    per_variant = [gradient_fields(m, x) for *_, m in variants]
    out: list[Footprint] = []
    for stage in range(len(model.stages)):
        block = f"stages.{stage}.{len(model.stages[stage]) - 1}"
        for (label, k, trained, _), fields in zip(variants, per_variant, strict=True):
            grad, grid, cell = fields[stage]
            centre = ((cell[0] + 0.5) * size[0] / grid[0], (cell[1] + 0.5) * size[1] / grid[1])
            out.append(make_footprint(label, k, trained, stage, block, grad, centre))
    return out


def analyse_conv2former(model: nn.Module, x: torch.Tensor, groups: int = GROUPS,
                        kernel_sizes: Sequence[int] = KERNEL_SIZES, seed: int = SEED) -> Conv2FormerAnalysis:
    """Capture every block's A and V for one image (1, 3, H, W), reduce them, and measure footprints."""
    if not isinstance(model, Conv2Former):
        raise ValueError(f"{type(model).__name__} is not a Conv2Former")
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, 3, H, W), got {tuple(x.shape)}")
    output, maps = capture_maps(model, x, select=lambda n: n.endswith((".attn.modulation", ".attn.value")))
    blocks = []
    for key, a in maps.items():
        if key.endswith(".modulation") and "#" not in key:
            name = key[: -len(ATTN_SUFFIX + ".modulation")]
            blocks.append(_block_maps(model, name, a, maps[f"{name}{ATTN_SUFFIX}.value"], groups))
    return Conv2FormerAnalysis(
        logits=output[0].detach().float(),
        input_size=(int(x.shape[-2]), int(x.shape[-1])),
        kernel_size=int(model.kernel_size),
        groups=groups,
        blocks=blocks,
        footprints=footprints(model, x, kernel_sizes, seed),
    )


# --- next to ViT attention -----------------------------------------------------------------------


def vit_footprint(vit: AttentionAnalysis, input_size: tuple[int, int], query: tuple[int, int] | None = None,
                  layer: int = -1, name: str = "ViT") -> Footprint:
    """A ViT query's attention (head mean, renormalised over patches) spread evenly over the pixels of
    each patch, so it is a distribution over input pixels like a gradient footprint."""
    h, w = vit.grid
    row, col = query if query is not None else (h // 2, w // 2)
    attn = vit.layers[vit.layer_names[layer]]
    values = metrics.query_maps(attn, vit.num_prefix_tokens, [row * w + col], vit.grid)[:, 0].mean(0)
    height, width = input_size
    rows = (torch.arange(height) * h) // height  # pixel y lies in patch floor(y * h / H), as overlay does
    cols = (torch.arange(width) * w) // width
    counts = torch.bincount(rows, minlength=h)[:, None] * torch.bincount(cols, minlength=w)[None, :]
    per_pixel = (values / counts.clamp_min(1))[rows[:, None], cols[None, :]]
    centre = ((row + 0.5) * height / h, (col + 0.5) * width / w)
    depth = len(vit.layers) if layer < 0 else layer + 1
    return make_footprint(f"{name} attention, layer {depth}, query ({row}, {col})", 0, True, -1,
                          vit.layer_names[layer], per_pixel, centre)


def comparison_sentence(analysis: Conv2FormerAnalysis, stage: int, vit: Footprint | None, label: str) -> str:
    """The footprints of one stage in one sentence (side holding half of the mass, mean distance)."""
    parts = [f"{f.label}: half of the mass within a {f.side[0.5]}-px square, mean distance {f.mean_distance:.1f} px"
             for f in analysis.stage_footprints(stage)]
    if vit is not None:
        parts.append(f"{vit.label}: {vit.side[0.5]}-px square, {vit.mean_distance:.1f} px")
    return (f"At the end of stage {stage + 1} of {label}, the centre output draws on: " + "; ".join(parts) + ".")


def modulation_sentence(maps: ModulationMaps) -> str:
    """How strongly A varies over the image compared with V in one block."""
    cv = maps.spatial_cv
    if round(cv["modulation"], 2) == round(cv["value"], 2):
        stronger = "about as much over positions as"
    else:
        stronger = f"{'more' if cv['modulation'] > cv['value'] else 'less'} over positions than"
    return (f"In {maps.label}, |A| varies {stronger} |V| (spatial coefficient of variation "
            f"{cv['modulation']:.2f} against {cv['value']:.2f}); |A⊙V| has {cv['product']:.2f}.")

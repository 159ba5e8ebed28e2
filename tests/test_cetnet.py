"""CETNet (paper reimplementation): sizes per CE depth, forward/backward, LEWin capture and thread isolation.

There is no official checkpoint, so the layout checks compare against (a) timm's Swin-T/S/B transformer blocks
(the paper matches Swin's widths/depths; LEWin adds only the depthwise conv projections) and (b) parameter
counts derived by hand from the design rules in the module docstring.
"""

from __future__ import annotations

import math
import threading

import pytest
import timm
import torch
import torch.nn.functional as F

import models.cetnet  # noqa: F401  (registers the family with timm)
from models.capture import capturing
from models.cetnet import ConvEmbed, FusedMBConv, MBConv, StemEmbed

NAMES = ("cetnet_t", "cetnet_s", "cetnet_b", "cetnet_cifar")
DEPTHS = (1, 3, 5, 7)
SWIN = {"cetnet_t": "swin_tiny_patch4_window7_224", "cetnet_s": "swin_small_patch4_window7_224",
        "cetnet_b": "swin_base_patch4_window7_224"}
# design of each variant: (C, blocks per stage, stem widths, window, heads)
ARCH = {
    "cetnet_t": (96, (2, 2, 6, 2), (24, 48), 7, (3, 6, 12, 24)),
    "cetnet_s": (96, (2, 2, 18, 2), (24, 48), 7, (3, 6, 12, 24)),
    "cetnet_b": (128, (2, 2, 18, 2), (32, 64), 7, (4, 8, 16, 32)),
    "cetnet_cifar": (32, (2, 2, 6, 2), (16, 32), 4, (2, 4, 8, 16)),
}


def _meta(name: str, **kwargs: object) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _params(module: torch.nn.Module, skip: str | None = None) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if skip is None or skip not in n)


def _hidden(c_in: int, c_out: int, depth: int) -> int:
    """Rule from the docstring: CE conv weights = Swin patch merging's 4*C_in*C_out, hidden rounded to 8."""
    return max(8, round(4 * c_in * c_out / ((c_in + 9 + c_out) + (depth - 1) * (2 * c_out + 9)) / 8) * 8)


def _expected_params(name: str, depth: int) -> int:
    """Everything except the Swin-shaped transformer blocks, counted by hand (BN/LN: 2 per channel)."""
    dim, blocks, (c0, c1), window, heads = ARCH[name]
    classes = 10 if name.endswith("cifar") else 1000

    def fused(i: int, o: int, h: int) -> int:
        return 9 * i * h + 2 * h + h * o + 2 * o

    def mbconv(i: int, o: int, h: int) -> int:
        return i * h + 2 * h + 9 * h + 2 * h + h * o + 2 * o

    total = fused(3, c0, c0) + fused(c0, c0, c0)  # S0
    total += fused(c0, c1, 2 * c0) + fused(c1, c1, 2 * c1) + c1 * dim + dim + 2 * dim  # S1 CE
    dims = [dim * 2 ** i for i in range(4)]
    for c_in, c_out in zip(dims[:-1], dims[1:], strict=True):
        h = _hidden(c_in, c_out, depth)
        total += mbconv(c_in, c_out, h) + (depth - 1) * mbconv(c_out, c_out, h) + 2 * c_out
    total += sum(n * 3 * 11 * c for n, c in zip(blocks, dims, strict=True))  # conv projection: 3 x (dw 3x3 + BN)
    total += 2 * dims[-1] + dims[-1] * classes + classes  # final norm + head
    # Swin-shaped blocks: 2 LN, q/k/v/proj, MLP x4, relative position bias table
    total += sum(n * (12 * c * c + 13 * c + (2 * window - 1) ** 2 * h) for n, c, h in
                 zip(blocks, dims, heads, strict=True))
    return total


def test_registered_and_cfgs() -> None:
    assert set(NAMES) <= set(timm.list_models("cetnet*"))
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["interpolation"] == "bicubic" and not cfg.get("url")
        if name == "cetnet_cifar":
            assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10 and cfg["crop_pct"] == 1.0
            assert tuple(cfg["mean"]) == (0.4914, 0.4822, 0.4465) and tuple(cfg["std"]) == (0.2470, 0.2435, 0.2616)
        else:
            assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000 and cfg["crop_pct"] == 0.9
            assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406) and tuple(cfg["std"]) == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("name", NAMES)
def test_ce_depth_layout_and_constant_params(name: str) -> None:
    counts = []
    for depth in DEPTHS:
        model = _meta(name, ce_depth=depth)
        counts.append(_params(model))
        assert counts[-1] == _expected_params(name, depth)
        # S0 + S1's CE: 4 Fused-MBConv + one regular (1x1) conv
        assert sum(isinstance(m, FusedMBConv) for m in model.stem) == 2
        assert isinstance(model.stages[0].embed, StemEmbed)
        assert sum(isinstance(m, FusedMBConv) for m in model.stages[0].embed.modules()) == 2
        for stage in model.stages[1:]:
            assert isinstance(stage.embed, ConvEmbed)
            assert sum(isinstance(m, MBConv) for m in stage.embed.modules()) == depth
    assert max(counts) / min(counts) - 1 < 0.01, counts  # within 1% across CE depths
    if name == "cetnet_cifar":
        assert 2_000_000 <= min(counts) and max(counts) <= 4_000_000


@pytest.mark.parametrize("name", sorted(SWIN))
def test_blocks_match_swin(name: str) -> None:
    ours, swin = _meta(name), _meta(SWIN[name])
    ours_blocks = sum(_params(s.blocks, skip="conv_proj.") for s in ours.stages)
    swin_blocks = sum(_params(layer.blocks) for layer in swin.layers)
    assert ours_blocks == swin_blocks
    # whole model within 1% of Swin's size (the paper: CETNets match Swin-T/S/B)
    assert abs(_params(ours) / _params(swin) - 1) < 0.01


def _check_backward(model: torch.nn.Module, out: torch.Tensor) -> None:
    out.float().square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


def test_forward_backward_t_224() -> None:
    torch.manual_seed(0)
    model = timm.create_model("cetnet_t")
    x = torch.randn(1, 3, 224, 224)
    feats = model.forward_stage_features(x)
    assert [tuple(f.shape) for f in feats] == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]
    out = model.forward_head(feats[-1])
    assert out.shape == (1, 1000)
    _check_backward(model, out)


@pytest.mark.parametrize("depth", DEPTHS)
def test_forward_backward_cifar(depth: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model("cetnet_cifar", ce_depth=depth)
    x = torch.randn(1, 3, 32, 32)
    assert model.forward_features(x).shape == (1, 256, 2, 2)
    assert [tuple(f.shape[1:]) for f in model.forward_stage_features(x)] == [
        (32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    out = model(x)
    assert out.shape == (1, 10)
    _check_backward(model, out)


@pytest.fixture(scope="module")
def cifar() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("cetnet_cifar").eval()
    with torch.no_grad():  # non-trivial BN statistics so the conv projection check means something
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("size", (32, 36))
def test_capture_shapes_rows_and_names(cifar: torch.nn.Module, size: int) -> None:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        plain = cifar(x)
        with capturing() as maps:
            captured = cifar(x)
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)  # explicit path == SDPA path

    blocks = [f"stages.{i}.blocks.{j}.attn" for i, n in enumerate(ARCH["cetnet_cifar"][1]) for j in range(n)]
    expected = {"stem.output"} | {f"stages.{i}.embed.output" for i in range(4)}
    expected |= {f"{b}.{k}" for b in blocks for k in ("attn", "window")}
    assert set(maps) == expected
    for i, dim in enumerate(ARCH["cetnet_cifar"][0] * 2 ** k for k in range(4)):
        embed = maps[f"stages.{i}.embed.output"]
        assert embed.shape[:2] == (2, dim)
        for j in range(ARCH["cetnet_cifar"][1][i]):
            attn, info = maps[f"stages.{i}.blocks.{j}.attn.attn"], maps[f"stages.{i}.blocks.{j}.attn.window"]
            (h, w), (wh, ww), (sh, sw) = info["grid"], info["window"], info["shift"]
            assert (h, w) == tuple(embed.shape[2:])
            assert (wh, ww) == (min(4, h), min(4, w))
            assert (sh, sw) == ((0, 0) if j % 2 == 0 else (2 if h > 4 else 0, 2 if w > 4 else 0))
            n_windows = math.ceil(h / wh) * math.ceil(w / ww)
            assert attn.shape == (2, ARCH["cetnet_cifar"][4][i], n_windows, wh * ww, wh * ww)
            torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
            assert (attn >= 0).all()


def _window_attention_reference(attn_mod: torch.nn.Module, x: torch.Tensor, window: int, shift: int,
                                wy: int, wx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of window (wy, wx) for batch item 0 and which of its queries are real (not padding).

    Token a of the window is the original (zero-padded) position ((wy*w + a//w + shift) mod Hp, ...); it may
    attend a key only if the two are genuine neighbours (|dy| < w and |dx| < w before the cyclic roll) and the
    key is not padding.
    """
    _, height, width, chs = x.shape
    hp, wp = math.ceil(height / window) * window, math.ceil(width / window) * window
    padded = F.pad(x[0], (0, 0, 0, wp - width, 0, hp - height))
    ay, ax = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    oy, ox = (wy * window + ay + shift) % hp, (wx * window + ax + shift) % wp
    tokens = padded[oy, ox]  # (w, w, C), window order
    image = tokens.permute(2, 0, 1).unsqueeze(0)
    heads = attn_mod.num_heads
    head_dim = chs // heads

    # depthwise 3x3 + BN per q/k/v: conv_proj output channel 3c + j is projection j (q, k, v) of channel c
    conv, bn = attn_mod.conv_proj.conv, attn_mod.conv_proj.bn
    ys, xs = torch.arange(window), torch.arange(window)

    def project(j: int, linear: torch.nn.Linear) -> torch.Tensor:
        out = torch.zeros(chs, window, window)
        for c in range(chs):
            kernel = conv.weight[3 * c + j, 0]
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    sy, sx = ys + dy, xs + dx
                    vy, vx = (sy >= 0) & (sy < window), (sx >= 0) & (sx < window)
                    shifted = torch.zeros(window, window)
                    shifted[vy[:, None] & vx[None, :]] = image[0, c][sy[vy]][:, sx[vx]].flatten()
                    out[c] += kernel[dy + 1, dx + 1] * shifted
        ch = 3 * torch.arange(chs) + j
        out = (out - bn.running_mean[ch, None, None]) / torch.sqrt(bn.running_var[ch, None, None] + bn.eps)
        out = out * bn.weight[ch, None, None] + bn.bias[ch, None, None]
        y = out.flatten(1).T @ linear.weight.T + linear.bias  # (N, C)
        return y.reshape(-1, heads, head_dim).transpose(0, 1)  # (heads, N, hd)

    q = project(0, attn_mod.proj_q)
    k = project(1, attn_mod.proj_k)
    logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    fy, fx, py, px = ay.flatten(), ax.flatten(), oy.flatten(), ox.flatten()
    table = attn_mod.relative_position_bias_table  # rows: (dy + w-1) * (2w-1) + (dx + w-1)
    rows = (fy[:, None] - fy[None, :] + window - 1) * (2 * window - 1) + (fx[:, None] - fx[None, :] + window - 1)
    logits = logits + table[rows].permute(2, 0, 1)
    allowed = ((py[:, None] - py[None, :]).abs() < window) & ((px[:, None] - px[None, :]).abs() < window)
    real = (py < height) & (px < width)
    allowed &= real[None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1), real


@pytest.mark.parametrize(("size", "block", "window_yx"), [(32, 1, (3, 3)), (32, 1, (1, 2)), (32, 0, (2, 1)),
                                                           (36, 1, (4, 4)), (36, 1, (4, 0))])
def test_window_attention_recomputed(cifar: torch.nn.Module, size: int, block: int,
                                     window_yx: tuple[int, int]) -> None:
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        with capturing(lambda n: n.startswith(f"stages.0.blocks.{block}.attn")) as maps:
            cifar(x)
        feat = cifar.stages[0].embed(cifar.stem(x)).permute(0, 2, 3, 1)
        for blk in cifar.stages[0].blocks[:block]:
            feat = blk(feat)
        target = cifar.stages[0].blocks[block]
        info = maps[f"stages.0.blocks.{block}.attn.window"]
        assert info["shift"] == ((2, 2) if block else (0, 0))
        ref, real = _window_attention_reference(target.attn, target.norm1(feat), 4, info["shift"][0], *window_yx)
    n_cols = math.ceil(info["grid"][1] / 4)
    got = maps[f"stages.0.blocks.{block}.attn.attn"][0, :, window_yx[0] * n_cols + window_yx[1]]
    # padded queries are discarded by the model; compare the rows of real tokens
    torch.testing.assert_close(got[:, real], ref[:, real], atol=1e-5, rtol=1e-4)


def test_select_window_only_skips_attention(cifar: torch.nn.Module) -> None:
    with torch.no_grad(), capturing(lambda n: n.endswith(".window")) as maps:
        cifar(torch.randn(1, 3, 32, 32))
    assert maps and all(n.endswith(".window") for n in maps)


def test_threads_capture_their_own_maps(cifar: torch.nn.Module) -> None:
    inputs = [torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)]
    refs = []
    with torch.no_grad():
        for x in inputs:
            with capturing() as maps:
                cifar(x)
            refs.append(dict(maps))
    barrier = threading.Barrier(2)
    errors: list[str] = []

    def work(index: int) -> None:
        try:
            for _ in range(3):
                barrier.wait()
                with torch.no_grad(), capturing() as maps:
                    cifar(inputs[index])
                assert set(maps) == set(refs[index])
                for key, value in maps.items():
                    if isinstance(value, torch.Tensor):
                        torch.testing.assert_close(value, refs[index][key], atol=1e-6, rtol=1e-5)
                    else:
                        assert value == refs[index][key]
        except Exception as exc:  # noqa: BLE001  (reported to the main thread)
            errors.append(f"thread {index}: {exc!r}")
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_local_checkpoint_loads_through_timm(tmp_path: object) -> None:
    torch.manual_seed(0)
    source = timm.create_model("cetnet_cifar", ce_depth=3)
    path = tmp_path / "cetnet_cifar.pth"  # type: ignore[operator]
    torch.save(source.state_dict(), path)
    loaded = timm.create_model("cetnet_cifar", ce_depth=3, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

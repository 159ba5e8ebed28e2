"""MOAT: parameter counts, forward/backward, attention capture and modes, TF padding, TF conversion."""

from __future__ import annotations

import copy
import threading
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the families)
import models.moat as moat
from models.capture import capture_name, capturing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Official unit-test totals (unstarred rows of the reference table): with / without position embedding.
PARAMS = {
    "moat_0": (27_846_892, 27_777_544),
    "moat_1": (41_598_448, 41_467_864),
    "tiny_moat_0": (3_355_348, 3_332_232),
    "tiny_moat_1": (5_122_895, 5_094_000),
    "tiny_moat_2": (9_772_741, 9_732_288),
    "tiny_moat_3": (19_534_390, 19_476_600),
}
# Starred rows: derived by the reference with P = 14/7, not confirmed by an official test.
PARAMS_STARRED = {"moat_2": 73_422_408, "moat_3": 189_958_040, "moat_4": 483_214_184}


def _count(name: str, **kwargs: Any) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def cifar() -> moat.Moat:
    torch.manual_seed(0)
    model = timm.create_model("moat_cifar").eval()
    _randomise_norms(model)
    return model


def _randomise_norms(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine terms, so layout mistakes cannot hide behind 0/1, and
    sharper attention than the 0.02-std init, so that the attention mode visibly changes outputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, moat.MoatAttention):
                module.q.weight.normal_(0, 0.3, generator=generator)
                module.k.weight.normal_(0, 0.3, generator=generator)
                module.v.weight.normal_(0, 0.3, generator=generator)
                module.o.weight.normal_(0, 0.3, generator=generator)
                module.relative_position_embedding.normal_(0, 1.0, generator=generator)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.normal_(1, 0.1, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)


# ----------------------------------------------------------------------------------------------
# Parameter counts and configs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_counts(name: str) -> None:
    with_pe, without_pe = PARAMS[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == with_pe
    # use_position_embedding=False only drops the tables (built for real in test_no_pe_tag...)
    tables = [p for n, p in params.items() if n.endswith("attention.relative_position_embedding")]
    assert len(tables) == len(model.stages[2]) + len(model.stages[3])
    assert sum(p.numel() for p in params.values()) - sum(p.numel() for p in tables) == without_pe


@pytest.mark.parametrize("name", list(PARAMS_STARRED))
def test_param_counts_starred(name: str) -> None:
    assert _count(name) == PARAMS_STARRED[name]


def test_no_pe_tag_and_cifar_config() -> None:
    assert _count("tiny_moat_0.tf_1k_256_no_pe") == PARAMS["tiny_moat_0"][1]
    assert _count("moat_0", use_position_embedding=False) == PARAMS["moat_0"][1]
    assert 2_000_000 <= _count("moat_cifar") <= 5_000_000
    cfg = timm.create_model("moat_cifar").pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10 and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == (0.4914, 0.4822, 0.4465) and cfg["std"] == (0.2470, 0.2435, 0.2616)
    with torch.device("meta"):
        big = timm.create_model("moat_2")
    assert big.pretrained_cfg["url"].endswith("moat2_imagenet_22k_and_1k_384_w_position_embedding.tar.gz")
    assert big.pretrained_cfg["input_size"] == (3, 384, 384) and big.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_bn_and_ln_eps() -> None:
    with torch.device("meta"):
        model = timm.create_model("tiny_moat_0")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    lns = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    assert lns and all(m.eps == 1e-5 for m in lns)


# ----------------------------------------------------------------------------------------------
# Forward / backward
# ----------------------------------------------------------------------------------------------


def test_tiny_moat_0_forward_backward_224() -> None:
    torch.manual_seed(0)
    model = timm.create_model("tiny_moat_0")
    x = torch.randn(1, 3, 224, 224)
    features = model.forward_features(x)
    assert features.shape == (1, 256, 7, 7)
    logits = model.forward_head(features)
    assert logits.shape == (1, 1000)
    logits.logsumexp(-1).sum().backward()
    assert model.stages[2][0].attention.relative_position_embedding.grad.abs().sum() > 0
    assert model.stem.conv_0.weight.grad.abs().sum() > 0


def test_cifar_forward_backward_32() -> None:
    torch.manual_seed(0)
    model = timm.create_model("moat_cifar", drop_path_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 320, 4, 4)
    logits = model.forward_head(features)
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_other_input_sizes(cifar: moat.Moat) -> None:
    with torch.no_grad():
        assert cifar(torch.randn(1, 3, 40, 56)).shape == (1, 10)
        assert cifar(torch.randn(1, 3, 33, 31)).shape == (1, 10)


# ----------------------------------------------------------------------------------------------
# Capture and attention modes
# ----------------------------------------------------------------------------------------------


def _resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear resampling matrix with half-pixel centres (TF2 ``image.resize``, no antialias)."""
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        matrix[i, lo] += 1 - frac
        matrix[i, hi] += frac
    return matrix


def _reference_attention(
    module: moat.MoatAttention, x: torch.Tensor, window: tuple[int, int] | None
) -> np.ndarray:
    """Post-softmax attention (B, heads, N, N) recomputed with loops from the definitions."""
    xs = x.double().numpy()
    batch, height, width, channels = xs.shape
    heads, d = module.num_heads, 32

    def project(linear: torch.nn.Linear) -> np.ndarray:
        out = xs.reshape(batch, height * width, channels) @ linear.weight.detach().double().numpy().T
        out = out + linear.bias.detach().double().numpy()
        return out.reshape(batch, height * width, heads, d).transpose(0, 2, 1, 3)

    q, k = project(module.q) * d**-0.5, project(module.k)
    wh, ww = window or (height, width)
    table = module.relative_position_embedding.detach().double().numpy()
    table = np.einsum(
        "ai,hij,bj->hab",
        _resize_matrix(2 * wh - 1, table.shape[1]),
        table,
        _resize_matrix(2 * ww - 1, table.shape[2]),
    )
    logits = np.einsum("bhnd,bhmd->bhnm", q, k)
    n = height * width
    bias = np.full((heads, n, n), -np.inf)
    for query in range(n):
        i, j = divmod(query, width)
        for key in range(n):
            r, c = divmod(key, width)
            if i // wh == r // wh and j // ww == c // ww:
                bias[:, query, key] = table[:, r - i + wh - 1, c - j + ww - 1]  # key minus query
    logits = logits + bias
    logits = logits - logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(-1, keepdims=True)


@pytest.mark.parametrize("window", [None, (4, 4), (3, 5)])
def test_attention_matches_independent_recomputation(
    cifar: moat.Moat, window: tuple[int, int] | None
) -> None:
    # 8x8 map, P = 8 (no resize for global, resize for windows); float64 for a tight comparison
    module = copy.deepcopy(cifar.stages[2][0].attention).double()
    torch.manual_seed(3)
    x = torch.randn(2, 8, 8, 192, dtype=torch.float64)
    mode = moat.GLOBAL if window is None else moat.AttentionMode("window", window)
    with torch.no_grad(), capturing() as maps:
        out_explicit = module(x, mode)
    with torch.no_grad():
        out_fused = module(x, mode)  # SDPA path when nobody captures
    attn = maps[f"{capture_name(module)}.attn"]
    assert attn.shape == (2, 6, 64, 64)
    np.testing.assert_allclose(attn.numpy(), _reference_attention(module, x, window), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out_fused, out_explicit)
    info = maps[f"{capture_name(module)}.window"]
    assert info == {"mode": "global" if window is None else "window", "grid": (8, 8), "window": window}


def test_capture_shapes_tiny_224() -> None:
    torch.manual_seed(0)
    model = timm.create_model("tiny_moat_0").eval()
    with torch.no_grad(), capturing(lambda n: n.endswith(".attn") or n.endswith(".window")) as maps:
        model(torch.randn(1, 3, 224, 224))
    attn = {k: v for k, v in maps.items() if k.endswith(".attn")}
    assert list(attn) == [f"stages.2.{b}.attention.attn" for b in range(7)] + [
        f"stages.3.{b}.attention.attn" for b in range(2)
    ]
    assert all(attn[f"stages.2.{b}.attention.attn"].shape == (1, 4, 196, 196) for b in range(7))
    assert all(attn[f"stages.3.{b}.attention.attn"].shape == (1, 8, 49, 49) for b in range(2))
    assert maps["stages.3.1.attention.window"] == {"mode": "global", "grid": (7, 7), "window": None}


def _block_ids(grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    rows = torch.arange(grid[0]).repeat_interleave(grid[1]) // window[0]
    cols = torch.arange(grid[1]).repeat(grid[0]) // window[1]
    return rows * 1000 + cols


@pytest.mark.parametrize("size,window", [(32, 4), (40, 4)])  # 8x8 in 4x4 windows; 10x10 with ragged edges
def test_window_attention_block_sparse(cifar: moat.Moat, size: int, window: int) -> None:
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        with moat.attention_mode(cifar, {2: window}), capturing() as maps:
            captured_logits = cifar(x)
        with moat.attention_mode(cifar, {2: window}):
            fused_logits = cifar(x)
        global_logits = cifar(x)
    torch.testing.assert_close(fused_logits, captured_logits, atol=1e-5, rtol=1e-5)
    assert (global_logits - captured_logits).abs().max() > 1e-4  # same weights, other mode
    grid = (size // 4, size // 4)
    ids = _block_ids(grid, (window, window))
    same = ids[:, None] == ids[None, :]
    for block in range(3):
        attn = maps[f"stages.2.{block}.attention.attn"]
        assert maps[f"stages.2.{block}.attention.window"] == {
            "mode": "window",
            "grid": grid,
            "window": (4, 4),
        }
        assert attn.shape == (1, 6, grid[0] * grid[1], grid[0] * grid[1])
        assert torch.all(attn[..., ~same] == 0)  # exactly zero across windows
        assert torch.all(attn[..., same] > 0)
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    assert maps["stages.3.0.attention.window"]["mode"] == "global"  # stage 3 untouched


def test_mode_setter_context_and_parsing(cifar: moat.Moat) -> None:
    model = timm.create_model("moat_cifar").eval()
    model.load_state_dict(cifar.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference_global = model(x)
        with moat.attention_mode(model, "window"):  # stage defaults: 4x4 and 2x2
            reference_window = model(x)
            assert model.attention_modes() == {
                2: moat.AttentionMode("window", (4, 4)),
                3: moat.AttentionMode("window", (2, 2)),
            }
        model.set_attention_mode([(4, 4), "window:2x2"])  # persistent, no reload
        torch.testing.assert_close(model(x), reference_window)
        with moat.attention_mode(None, "global"):  # per-context override beats the persistent mode
            torch.testing.assert_close(model(x), reference_global)
        with moat.attention_mode(cifar, "global"):  # an override for another model does not apply
            torch.testing.assert_close(model(x), reference_window)
        model.set_attention_mode([None, None, "global", "global"])
        torch.testing.assert_close(model(x), reference_global)
    # timm's features_only wrapper calls the stages directly: the context still applies
    features = timm.create_model("moat_cifar", features_only=True).eval()
    with torch.no_grad():
        global_maps = features(x)
        with moat.attention_mode(None, {2: 4}):
            window_maps = features(x)
    torch.testing.assert_close(window_maps[1], global_maps[1])  # MBConv stage: unchanged
    assert not torch.equal(window_maps[2], global_maps[2])
    assert model.parse_attention_modes({3: 2}) == {3: moat.AttentionMode("window", (2, 2))}
    assert model.parse_attention_modes("window:14x16")[2] == moat.AttentionMode("window", (14, 16))
    with pytest.raises(ValueError):
        model.parse_attention_modes({1: 4})  # an MBConv stage has no attention
    with pytest.raises(ValueError):
        model.parse_attention_modes("windowed")
    with pytest.raises(ValueError), moat.attention_mode(model, "window:0"):
        pass


def test_attention_mode_is_per_thread(cifar: moat.Moat) -> None:
    x = torch.randn(1, 3, 32, 32)
    specs = {"a": {2: 4}, "b": "global"}
    with torch.no_grad():
        expected = {}
        for key, spec in specs.items():
            with moat.attention_mode(cifar, spec):
                expected[key] = cifar(x)
    barrier = threading.Barrier(2)
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def worker(key: str) -> None:
        try:
            with moat.attention_mode(cifar, specs[key]), torch.no_grad():
                barrier.wait()  # both threads hold their (different) modes at the same time
                outputs = []
                for _ in range(3):
                    with capturing(lambda n: n.endswith(".window")) as maps:
                        outputs.append(cifar(x))
                    results[key] = (outputs, dict(maps))
        except BaseException as error:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(key,)) for key in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for key, expected_mode in (("a", "window"), ("b", "global")):
        outputs, maps = results[key]
        for output in outputs:
            torch.testing.assert_close(output, expected[key])
        assert maps["stages.2.0.attention.window"]["mode"] == expected_mode
    assert (expected["a"] - expected["b"]).abs().max() > 1e-4
    assert cifar.attention_modes() == {2: moat.GLOBAL, 3: moat.GLOBAL}  # nothing leaked


# ----------------------------------------------------------------------------------------------
# TF 'same' padding
# ----------------------------------------------------------------------------------------------


def _tf_same_conv_numpy(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """Direct TF 'same' conv: out = ceil(n / s); the odd padding pixel goes to the bottom/right."""
    _, channels, height, width = x.shape
    out_ch, _, kh, kw = w.shape
    oh, ow = -(-height // stride), -(-width // stride)
    top = max((oh - 1) * stride + kh - height, 0) // 2
    left = max((ow - 1) * stride + kw - width, 0) // 2
    out = np.zeros((x.shape[0], out_ch, oh, ow))
    for oy in range(oh):
        for ox in range(ow):
            for dy in range(kh):
                for dx in range(kw):
                    iy, ix = oy * stride - top + dy, ox * stride - left + dx
                    if 0 <= iy < height and 0 <= ix < width:
                        out[:, :, oy, ox] += x[:, :, iy, ix] @ w[:, :, dy, dx].T
    return out


def _tf_same_avg_pool_numpy(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """Keras AveragePooling2D 'same': averages over the in-bounds cells of each window only."""
    height, width = x.shape[-2:]
    oh, ow = -(-height // stride), -(-width // stride)
    top = max((oh - 1) * stride + kernel - height, 0) // 2
    left = max((ow - 1) * stride + kernel - width, 0) // 2
    out = np.zeros((*x.shape[:2], oh, ow))
    for oy in range(oh):
        for ox in range(ow):
            y0, x0 = oy * stride - top, ox * stride - left
            cells = x[..., max(y0, 0) : y0 + kernel, max(x0, 0) : x0 + kernel]
            out[..., oy, ox] = cells.mean(axis=(-2, -1))
    return out


@pytest.mark.parametrize("size", [8, 7])
def test_tf_same_padding(size: int) -> None:
    torch.manual_seed(0)
    conv = moat.Conv2dSame(3, 4, 3, stride=2, bias=False).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        ours = conv(x)
    expected = _tf_same_conv_numpy(x.numpy(), conv.weight.detach().numpy(), 2)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-10)
    if size % 2 == 0:  # the reference's rule for even inputs: pad (0, 1, 0, 1), then a plain conv
        torch.testing.assert_close(ours, F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2))
    for kernel in (2, 3):
        pooled = moat.avg_pool_same(x, kernel, 2)
        np.testing.assert_allclose(pooled.numpy(), _tf_same_avg_pool_numpy(x.numpy(), kernel, 2), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# TF checkpoint conversion
# ----------------------------------------------------------------------------------------------

_TF_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def _to_tf_variables(state: dict[str, torch.Tensor], suffix: str = "") -> dict[str, np.ndarray]:
    """Write a state_dict in deeplab2's Keras names and layouts (inverse of the port, from the facts).

    Conv kernels are [kh, kw, in, out]; depthwise [kh, kw, C, 1]; q/k/v TrailDense [C, heads, 32]
    with bias [heads, 32]; o [heads, 32, C]; BN gamma/beta/moving_mean/moving_variance; LN gamma/beta.
    """
    variables = {}
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        value = tensor.detach().numpy()
        parts = key.split(".")
        leaf = parts[-1]
        if parts[0] == "stages":
            scope = [f"block_{int(parts[1]):02d}_{int(parts[2]):02d}", *parts[3:-1]]
        else:
            scope = parts[:-1]
        layer = scope[-1]
        if layer in ("pre_norm", "expand_norm", "depthwise_norm") or layer.startswith("norm_"):
            leaf = _TF_BN[leaf]
        elif layer in ("attention_norm", "final_layer_norm"):
            leaf = {"weight": "gamma", "bias": "beta"}[leaf]
        elif layer == "depthwise_conv":
            leaf, value = "depthwise_kernel", value.transpose(2, 3, 0, 1)
        elif layer in ("q", "k", "v"):
            channels = value.shape[-1]
            if leaf == "weight":
                value = value.T.reshape(channels, channels // 32, 32)
            else:
                value = value.reshape(-1, 32)
        elif layer == "o":
            if leaf == "weight":
                value = value.T.reshape(value.shape[0] // 32, 32, value.shape[0])
        elif leaf == "weight" and value.ndim == 4:
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)
        elif leaf == "weight":
            raise AssertionError(f"unexpected weight {key}")
        name = "/".join([*scope, leaf])
        # the stem's Keras Sequential scope: keep one stem variable without the model scope
        prefix = "" if key == "stem.conv_0.weight" else "moat/"
        variables[prefix + name + suffix] = np.array(value, copy=True)
    return variables


def test_convert_tf_round_trip(cifar: moat.Moat) -> None:
    torch.manual_seed(7)
    other = timm.create_model("moat_cifar").eval()
    _randomise_norms(other)
    variables = _to_tf_variables(cifar.state_dict(), ":0")
    ema = _to_tf_variables(other.state_dict())
    variables.update({name + "/ExponentialMovingAverage": value for name, value in ema.items()})
    variables["global_step"] = np.array(1000)
    variables["moat/block_02_00/attention/q/weight/Momentum"] = np.zeros(1)
    assert variables["moat/block_02_00/attention/q/weight:0"].shape == (192, 6, 32)
    assert variables["moat/block_02_00/attention/o/weight:0"].shape == (6, 32, 192)
    assert variables["moat/block_00_00/depthwise_conv/depthwise_kernel:0"].shape == (3, 3, 256, 1)
    assert variables["moat/logits_head/kernel:0"].shape == (1, 1, 320, 10)

    x = torch.randn(2, 3, 32, 32)
    for prefer_ema, source in ((False, cifar), (True, other)):
        converted = moat.convert_tf_variables(variables, prefer_ema=prefer_ema)
        fresh = timm.create_model("moat_cifar").eval()
        fresh.load_state_dict(converted, strict=True)
        with torch.no_grad():
            assert torch.equal(fresh(x), source(x))
    with pytest.raises(ValueError):
        moat.convert_tf_variables(variables, strict=True)


def test_convert_tf_names_cover_tiny_moat() -> None:
    with torch.device("meta"):
        model = timm.create_model("tiny_moat_0")
    state = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    converted = moat.convert_tf_variables(_to_tf_variables(state))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_local_file_loads_through_timm(cifar: moat.Moat, tmp_path: Any) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "moat_cifar.safetensors"
    save_file({k: v.contiguous() for k, v in cifar.state_dict().items()}, str(path))
    loaded = timm.create_model(
        "moat_cifar", pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), cifar(x))

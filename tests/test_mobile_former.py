"""Mobile-Former: parameter counts, official key layout, loading, forward/backward and capture."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import models.mobile_former as mf
from models.capture import capturing, name_capture_points

DATA = Path(__file__).parent / "data"

# Reference table (ARCHITECTURES.md section 2), 1000-class head included.
PARAMS = {
    "mobile_former_508m": 13_976_976,
    "mobile_former_294m": 11_422_648,
    "mobile_former_214m": 9_425_920,
    "mobile_former_151m": 7_595_828,
    "mobile_former_96m": 4_585_252,
    "mobile_former_52m": 3_469_092,
    "mobile_former_26m": 3_232_788,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spread_linears(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw the Linear weights (init is N(0, 0.01)) so attention maps are far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 2.0 / math.sqrt(m.in_features))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        model.tokens.weight.copy_(torch.randn(model.tokens.weight.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def cifar() -> nn.Module:
    torch.manual_seed(0)
    return _spread_linears(timm.create_model("mobile_former_cifar")).eval()


def _bridged(model: nn.Module) -> list[int]:
    return [i for i, b in enumerate(model.features) if hasattr(b, "local_global")]


# --- recomputation from the reference facts, independent of the module code -------------------------


def m2f_attn(mod: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mobile->Former: q = Linear(Z) in 2 heads, K = X, softmax over H*W of q.K / sqrt(C/2)."""
    b, c, h, w = x.shape
    t = tokens.shape[1]
    q = F.linear(tokens, mod.q.weight, mod.q.bias).reshape(b, t, 2, c // 2)
    keys = x.reshape(b, 2, c // 2, h * w)
    logits = torch.einsum("bthd,bhdp->bhtp", q, keys) / math.sqrt(c // 2)
    return logits.softmax(-1).reshape(b, 2, t, h, w)


def f2m(mod: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mobile<-Former: Q = X, K = Linear_k(Z), V = Linear_proj(Z), softmax over T; (attn, X + attn.V)."""
    b, c, h, w = x.shape
    t = tokens.shape[1]
    k = F.linear(tokens, mod.k.weight, mod.k.bias).reshape(b, t, 2, c // 2)
    v = F.linear(tokens, mod.proj.weight, mod.proj.bias).reshape(b, t, 2, c // 2)
    queries = x.reshape(b, 2, c // 2, h * w)
    attn = (torch.einsum("bhdp,bthd->bhpt", queries, k) / math.sqrt(c // 2)).softmax(-1)
    out = torch.einsum("bhpt,bthd->bhdp", attn, v).reshape(b, c, h, w)
    return attn.reshape(b, 2, h, w, t), x + out


def dyrelu(x: torch.Tensor, hyper: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Dynamic ReLU from token 0: max(k1 x, k2 x), k1 = 2(a1 - 0.5) + 1, k2 = 2(a2 - 0.5)."""
    a = hyper.hyper(tokens[:, 0])
    a1, a2 = a[:, : x.shape[1], None, None], a[:, x.shape[1] :, None, None]
    return torch.max(x * (2 * (a1 - 0.5) + 1), x * (2 * (a2 - 0.5)))


def block_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, tokens) entering every block, then the pair entering the head."""
    feats = model.stem(x)
    tokens = model.tokens.weight.unsqueeze(0).repeat(x.shape[0], 1, 1)
    pairs = []
    for block in model.features:
        pairs.append((feats, tokens))
        feats, tokens = block(feats, tokens)
    pairs.append((feats, tokens))
    return pairs


# --- registry, counts, layout, loading ----------------------------------------------------------------


def test_registered_with_cfgs() -> None:
    assert set(timm.list_models("mobile_former_*")) == set(PARAMS) | {"mobile_former_cifar"}
    for name in PARAMS:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["url"].startswith("https://drive.google.com/file/d/")
        assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bilinear"
        assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
        assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
    cfg = timm.models.get_pretrained_cfg("mobile_former_cifar").to_dict()
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10 and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == (0.4914, 0.4822, 0.4465) and cfg["std"] == (0.2470, 0.2435, 0.2616)
    assert cfg["interpolation"] == "bicubic"


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_count(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_cifar_param_count() -> None:
    with torch.device("meta"):
        model = timm.create_model("mobile_former_cifar")
    assert 2_000_000 <= sum(p.numel() for p in model.parameters()) <= 4_000_000
    assert model.num_classes == 10


@pytest.mark.parametrize("name", ["mobile_former_508m", "mobile_former_26m"])
def test_key_layout_matches_official(name: str) -> None:
    manifest = json.loads((DATA / f"{name}_keys.json").read_text())
    with torch.device("meta"):
        model = timm.create_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest["keys"]
    assert list(ours) == list(manifest["keys"])  # same order as well
    assert manifest["num_params"] == PARAMS[name]


def test_strict_load_wrapped_checkpoint(tmp_path: Path) -> None:
    source = _spread_linears(timm.create_model("mobile_former_26m"), seed=3)
    path = tmp_path / "mobile_former_26m.pth.tar"
    torch.save({"state_dict": source.state_dict()}, path)  # the official files' layout

    direct = timm.create_model("mobile_former_26m")
    direct.load_state_dict(torch.load(path, map_location="cpu")["state_dict"], strict=True)
    via_timm = timm.create_model("mobile_former_26m", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    want = source.state_dict()
    for model in (direct, via_timm):
        got = model.state_dict()
        assert all(torch.equal(got[key], value) for key, value in want.items())

    # a new head drops only the classifier weights
    ten = timm.create_model("mobile_former_26m", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
    assert ten.get_classifier().out_features == 10
    assert torch.equal(ten.classifier.fc[0].weight, source.classifier.fc[0].weight)


# --- forward / backward -------------------------------------------------------------------------------


def test_forward_backward_224() -> None:
    model = timm.create_model("mobile_former_508m")
    # eval mode: the head's BatchNorm1d cannot train on a batch of 1
    model.eval()
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    out.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_forward_backward_224_grouped_train() -> None:
    model = timm.create_model("mobile_former_26m", drop_path_rate=0.1).train()
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    out.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_forward_backward_cifar() -> None:
    model = timm.create_model("mobile_former_cifar", drop_path_rate=0.1).train()
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 10)
    F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    feats = model.forward_features(x)
    assert feats.shape == (4, 96, 4, 4)  # 32x32 input ends as a 4x4 map


def test_forward_features_shape() -> None:
    model = timm.create_model("mobile_former_52m").eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 96, 7, 7)
        assert model.forward_features(torch.randn(1, 3, 160, 192)).shape == (1, 96, 5, 6)  # any size
        feats, tokens = model.forward_trunk(torch.randn(2, 3, 64, 64))
        assert feats.shape == (2, 96, 2, 2) and tokens.shape == (2, 3, 128)
        assert model.forward_head(feats, tokens, pre_logits=True).shape == (2, 1024)
    assert model.num_features == 96 and model.head_hidden_size == 1024


# --- capture ------------------------------------------------------------------------------------------


def test_capture_keys_shapes_and_rows(cifar: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = cifar(x)
        with capturing() as maps:
            captured = cifar(x)
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-5)  # explicit path == fused path

    pairs = block_inputs(cifar, x)
    expected = []
    for i in _bridged(cifar):
        expected += [f"features.{i}.local_global.attn", f"features.{i}.global_local.attn", f"features.{i}.tokens"]
    expected.append("local_global.attn")
    assert sorted(maps) == sorted(expected)
    assert "features.0.local_global.attn" not in maps  # the conv-only block has no bridges

    t = cifar.token_num
    for i in _bridged(cifar):
        h, w = pairs[i][0].shape[-2:]
        ho, wo = pairs[i + 1][0].shape[-2:]
        m2f = maps[f"features.{i}.local_global.attn"]
        f2m_map = maps[f"features.{i}.global_local.attn"]
        assert m2f.shape == (2, 2, t, h, w)
        assert f2m_map.shape == (2, 2, ho, wo, t)
        assert maps[f"features.{i}.tokens"].shape == (2, t, cifar.token_dim)
        torch.testing.assert_close(m2f.sum((-1, -2)), torch.ones(2, 2, t))
        torch.testing.assert_close(f2m_map.sum(-1), torch.ones(2, 2, ho, wo))
        assert (m2f >= 0).all() and (f2m_map >= 0).all()
        # the block's tokens are the next block's input tokens
        torch.testing.assert_close(maps[f"features.{i}.tokens"], pairs[i + 1][1])
    assert maps["local_global.attn"].shape == (2, 2, t, 4, 4)


def test_mobile_to_former_recomputed(cifar: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pairs = block_inputs(cifar, x)
        with capturing(lambda n: n.endswith("local_global.attn")) as maps:
            cifar(x)
        for i in _bridged(cifar):
            feats, tokens = pairs[i]
            want = m2f_attn(cifar.features[i].local_global, feats, tokens)
            torch.testing.assert_close(maps[f"features.{i}.local_global.attn"], want, rtol=1e-4, atol=1e-6)
        feats, tokens = pairs[-1]
        torch.testing.assert_close(maps["local_global.attn"], m2f_attn(cifar.local_global, feats, tokens), rtol=1e-4, atol=1e-6)
    # not a trivially uniform map
    hw = pairs[3][0].shape[-1] * pairs[3][0].shape[-2]
    assert maps["features.3.local_global.attn"].amax() > 3.0 / hw


def test_former_to_mobile_recomputed(cifar: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    i = 3  # a DnaBlock (24 -> 24, identity skip) of the CIFAR config
    block = cifar.features[i]
    assert isinstance(block, mf.DnaBlock) and block.identity
    with torch.no_grad():
        feats, tokens = block_inputs(cifar, x)[i]
        with capturing() as maps:
            out, _ = block(feats, tokens)
        # conv path rebuilt from the reference facts: 1x1 -> DyReLU -> DW3x3 -> DyReLU -> 1x1, skip, then G2L
        tokens = block.global_block(block.local_global(feats, tokens))
        hid = dyrelu(block.conv1(feats), block.hyper1, tokens)
        hid = dyrelu(block.conv2(hid), block.hyper2, tokens)
        g2l_in = block.conv3(hid) + feats
        attn, want_out = f2m(block.global_local, g2l_in, tokens)
    torch.testing.assert_close(maps[f"features.{i}.global_local.attn"], attn, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    assert maps[f"features.{i}.global_local.attn"].amax() > 1.2 / cifar.token_num


def _spread_linears_module(mod: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in mod.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 2.0 / math.sqrt(m.in_features))
    return mod


def test_bridge_modules_on_random_inputs() -> None:
    """Both bridges alone, odd sizes, captured map == recomputation, explicit and fused paths agree."""
    torch.manual_seed(1)
    m2f_mod = _spread_linears_module(mf.MobileToFormer(16, 32))
    f2m_mod = _spread_linears_module(mf.FormerToMobile(16, 32))
    for mod, path in ((m2f_mod, "m2f"), (f2m_mod, "f2m")):
        name_capture_points(mod, prefix=path)
    x, tokens = torch.randn(3, 16, 5, 7), torch.randn(3, 4, 32)
    with torch.no_grad():
        plain_t, plain_x = m2f_mod(x, tokens), f2m_mod(x, tokens)
        with capturing() as maps:
            cap_t, cap_x = m2f_mod(x, tokens), f2m_mod(x, tokens)
        attn, want_x = f2m(f2m_mod, x, tokens)
    torch.testing.assert_close(maps["m2f.attn"], m2f_attn(m2f_mod, x, tokens))
    torch.testing.assert_close(maps["f2m.attn"], attn)
    torch.testing.assert_close(cap_x, want_x)
    torch.testing.assert_close(plain_x, cap_x)
    torch.testing.assert_close(plain_t, cap_t)


def test_two_threads_get_their_own_maps(cifar: nn.Module) -> None:
    inputs = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (10, 11)]
    with torch.no_grad():
        expected = []
        for x in inputs:
            with capturing() as maps:
                cifar(x)
            expected.append(dict(maps))
    barrier = threading.Barrier(2)
    results: list[list[dict[str, torch.Tensor]]] = [[], []]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for _ in range(3):
                barrier.wait()
                with torch.no_grad(), capturing() as maps:
                    cifar(inputs[k])
                results[k].append(dict(maps))
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for k in (0, 1):
        assert len(results[k]) == 3
        for got in results[k]:
            assert list(got) == list(expected[k])  # nothing of the other thread, nothing doubled
            for key, value in got.items():
                torch.testing.assert_close(value, expected[k][key])
    # the two inputs really give different maps
    assert not torch.allclose(expected[0]["features.3.local_global.attn"], expected[1]["features.3.local_global.attn"])


def test_nothing_recorded_or_left_outside_capture(cifar: nn.Module) -> None:
    with torch.no_grad():
        cifar(torch.randn(1, 3, 32, 32))
    for m in cifar.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks

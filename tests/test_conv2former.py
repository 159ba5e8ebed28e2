"""Conv2Former: parameter counts, official key layout, loading, forward/backward, capture maps, threads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import models.conv2former  # noqa: F401  (registers the family with timm)
from models.capture import capturing
from models.conv2former import Conv2Former

MANIFEST = Path(__file__).parent / "data" / "conv2former_n_keys.json"

# Reference counts (ARCHITECTURES.md section 5, 1000-class head, current official kernels).
PARAM_COUNTS = {
    "conv2former_n": 14_992_840,
    "conv2former_t": 26_697_204,
    "conv2former_s": 50_032_692,
    "conv2former_b": 90_029_112,
    "conv2former_b_22k": 88_784_952,
    "conv2former_l": 198_893_736,
}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _manifest() -> dict[str, list[int]]:
    return json.loads(MANIFEST.read_text())["keys"]


def _official_like_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors laid out as the official conv2former_n checkpoint (from the manifest only)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in _manifest().items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(7, dtype=torch.long)
        elif name.endswith("running_var"):
            out[name] = torch.rand(shape, generator=gen) + 0.5
        else:
            out[name] = torch.randn(shape, generator=gen) * 0.1
    return out


def _unwrap(checkpoint: dict) -> dict[str, torch.Tensor]:
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def _ln_channels_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # The official channels-first LayerNorm formula, written out.
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return weight[:, None, None] * (x - u) / torch.sqrt(s + eps) + bias[:, None, None]


def _randomise(model: Conv2Former, seed: int = 0) -> Conv2Former:
    """Non-trivial LN affines, biases and layer scales (1e-6 would hide errors past the first block)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layer_scale_1", "layer_scale_2")):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
            elif name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _block_input(model: Conv2Former, x: torch.Tensor, stage: int, block: int) -> torch.Tensor:
    """Input of ``stages[stage][block]``, run through the preceding modules."""
    for i in range(stage + 1):
        x = model.downsample_layers[i](x)
        blocks = model.stages[i] if i < stage else model.stages[i][:block]
        x = blocks(x)
    return x


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_model() -> Conv2Former:
    torch.manual_seed(0)
    return _randomise(timm.create_model("conv2former_cifar"))


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_param_counts(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert _count(model) == PARAM_COUNTS[name]


def test_kernel_override_and_kernels() -> None:
    with torch.device("meta"):
        n11 = timm.create_model("conv2former_n", kernel_size=11)
        t = timm.create_model("conv2former_t")
        b22 = timm.create_model("conv2former_b_22k")
    assert _count(n11) == 15_241_672  # the pre-2025 N (k = 11)
    assert n11.stages[0][0].attn.att[2].weight.shape == (64, 1, 11, 11)
    assert t.stages[0][0].attn.att[2].weight.shape == (72, 1, 11, 11)
    assert b22.stages[0][0].attn.att[2].weight.shape == (96, 1, 7, 7)


def test_key_layout_equals_official() -> None:
    manifest = _manifest()
    assert json.loads(MANIFEST.read_text())["num_params"] == PARAM_COUNTS["conv2former_n"]
    with torch.device("meta"):
        model = timm.create_model("conv2former_n")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(manifest)
    assert ours == manifest


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_strict_load_of_wrapped_checkpoint(wrapper: str, tmp_path: Path) -> None:
    official = _official_like_state_dict()
    path = tmp_path / "conv2former_n.pth"
    torch.save({wrapper: official, "epoch": 299}, path)
    model = timm.create_model("conv2former_n")
    result = model.load_state_dict(_unwrap(torch.load(path, weights_only=True)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in official.items())
    if wrapper == "model":  # timm's own loader, as the app uses it
        via_timm = timm.create_model("conv2former_n", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        assert torch.equal(via_timm.pred.weight, official["pred.weight"])


def test_pretrained_cfgs() -> None:
    cfg = timm.create_model("conv2former_n").pretrained_cfg
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic" and cfg["input_size"] == (3, 224, 224)
    assert cfg["url"].startswith("https://pan.baidu.com/") and cfg["num_classes"] == 1000
    cifar = timm.create_model("conv2former_cifar").pretrained_cfg
    assert cifar["input_size"] == (3, 32, 32) and cifar["num_classes"] == 10 and cifar["crop_pct"] == 1.0
    assert cifar["mean"] == (0.4914, 0.4822, 0.4465) and cifar["std"] == (0.2470, 0.2435, 0.2616)


def test_forward_backward_n_224_and_capture_shapes() -> None:
    torch.manual_seed(0)
    model = timm.create_model("conv2former_n")
    x = torch.randn(1, 3, 224, 224)
    with capturing() as maps:
        feats = model.forward_features(x)
    assert feats.shape == (1, 512, 7, 7)
    logits = model.forward_head(feats)
    assert logits.shape == (1, 1000)
    logits.sum().backward()
    assert model.downsample_layers[0][0].weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    dims, sizes, depths = (64, 128, 256, 512), (56, 28, 14, 7), (2, 2, 8, 2)
    expected = [
        f"stages.{s}.{b}.attn.{key}" for s in range(4) for b in range(depths[s]) for key in ("modulation", "value")
    ]
    assert list(maps) == expected
    for name, value in maps.items():
        s = int(name.split(".")[1])
        assert value.shape == (1, dims[s], sizes[s], sizes[s])
        assert not value.requires_grad


def test_cifar_forward_backward() -> None:
    torch.manual_seed(0)
    model = timm.create_model("conv2former_cifar")
    assert 2_000_000 <= _count(model) <= 5_000_000
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 256, 2, 2)
    logits = model.forward_head(feats)
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # Any input size works (capture maps follow the stage resolution).
    with torch.no_grad(), capturing(lambda n: n.startswith("stages.0.0.")) as maps:
        model(torch.randn(1, 3, 40, 24))
    assert maps["stages.0.0.attn.modulation"].shape == (1, 48, 20, 12)


@pytest.mark.parametrize(("stage", "block"), [(0, 0), (2, 3), (3, 1)])
def test_modulation_obeys_definition(small_model: Conv2Former, stage: int, block: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with capturing() as maps:
            small_model(x)
        a = maps[f"stages.{stage}.{block}.attn.modulation"]
        v = maps[f"stages.{stage}.{block}.attn.value"]
        mod = small_model.stages[stage][block].attn
        x_in = _block_input(small_model, x, stage, block)

        # A and V recomputed from the block input with functional ops on the raw weights.
        y = _ln_channels_first(x_in, mod.norm.weight, mod.norm.bias)
        w_dw = mod.att[2].weight
        a_ref = F.conv2d(F.gelu(F.conv2d(y, mod.att[0].weight, mod.att[0].bias)), w_dw, mod.att[2].bias,
                         padding=w_dw.shape[-1] // 2, groups=w_dw.shape[0])
        v_ref = F.conv2d(y, mod.v.weight, mod.v.bias)
        torch.testing.assert_close(a, a_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-5)

        # The ConvMod output is proj(A * V) of the captured maps.
        out = mod(x_in)
        torch.testing.assert_close(out, F.conv2d(a * v, mod.proj.weight, mod.proj.bias), rtol=1e-4, atol=1e-5)


def test_no_capture_outside_context(small_model: Conv2Former) -> None:
    with torch.no_grad():
        small_model(torch.randn(1, 3, 32, 32))  # records nothing, leaves nothing behind
        with capturing(lambda n: n.endswith(".modulation")) as maps:
            small_model(torch.randn(1, 3, 32, 32))
    assert len(maps) == 12 and all(n.endswith(".modulation") for n in maps)


def test_two_threads_capture_their_own_maps(small_model: Conv2Former) -> None:
    torch.manual_seed(2)
    inputs = [torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32) + 1.0]
    with torch.no_grad():
        expected = []
        for x in inputs:
            with capturing() as maps:
                small_model(x)
            expected.append(dict(maps))

    barrier = threading.Barrier(2, timeout=20)
    results: list[dict | None] = [None, None]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        met = False

        def select(name: str) -> bool:
            nonlocal met
            if not met:  # both threads are now inside capturing() and mid-forward at once
                met = True
                barrier.wait()
            return True

        try:
            with torch.no_grad(), capturing(select) as maps:
                small_model(inputs[i])
            results[i] = dict(maps)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    for got, want in zip(results, expected, strict=True):
        assert got is not None and list(got) == list(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)

"""FCViT: official layout and sizes, forward/backward, GlobalContext capture and thread isolation."""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import models.fcvit  # noqa: F401  (registers the family with timm)
from models.capture import capturing
from models.fcvit import GlobalContext

MANIFEST = Path(__file__).parent / "data" / "fcvit_tiny_keys.json"
KEYS = ("similarity", "similarity_norm", "similarity_rescaled", "context")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _count(name: str) -> tuple[int, int]:
    with torch.device("meta"):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters()), len(model.state_dict())


@pytest.mark.parametrize(
    ("name", "params", "tensors"),
    [
        ("fcvit_tiny", 4_784_752, 500),
        ("fcvit_b12", 14_701_832, 464),
        ("fcvit_b24", 26_960_232, 896),
        ("fcvit_b48", 51_477_032, 1760),
    ],
)
def test_parameter_and_tensor_counts(name: str, params: int, tensors: int) -> None:
    assert _count(name) == (params, tensors)


def test_cifar_config() -> None:
    params, _ = _count("fcvit_cifar")
    assert 2_000_000 <= params <= 4_000_000
    cfg = timm.create_model("fcvit_cifar").pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10 and cfg["crop_pct"] == 1.0
    assert tuple(cfg["mean"]) == (0.4914, 0.4822, 0.4465) and tuple(cfg["std"]) == (0.2470, 0.2435, 0.2616)
    assert cfg["interpolation"] == "bicubic"


@pytest.mark.parametrize(("name", "crop"), [("fcvit_tiny", 0.9), ("fcvit_b12", 0.9), ("fcvit_b24", 0.95),
                                            ("fcvit_b48", 0.95)])
def test_pretrained_cfg(name: str, crop: float) -> None:
    with torch.device("meta"):
        cfg = timm.create_model(name).pretrained_cfg
    assert cfg["crop_pct"] == crop and cfg["interpolation"] == "bicubic" and cfg["input_size"] == (3, 224, 224)
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406) and tuple(cfg["std"]) == (0.229, 0.224, 0.225)
    assert cfg["num_classes"] == 1000 and cfg["url"].startswith("https://drive.google.com/")


def _manifest() -> dict[str, list[int]]:
    data = json.loads(MANIFEST.read_text())
    assert data["num_tensors"] == len(data["keys"]) == 500
    return data["keys"]


def test_key_layout_matches_official_manifest() -> None:
    with torch.device("meta"):
        model = timm.create_model("fcvit_tiny")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == _manifest()


def _official_like_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in _manifest().items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=gen)
    return sd


@pytest.mark.parametrize("wrapper", ["state_dict", "state_dict_ema"])
def test_strict_load_of_wrapped_checkpoint(wrapper: str) -> None:
    checkpoint = {wrapper: _official_like_state_dict(), "epoch": 299}
    state_dict = checkpoint[wrapper]
    model = timm.create_model("fcvit_tiny")
    model.load_state_dict(state_dict, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_dict[key]), key


def test_timm_loads_local_file(tmp_path: Path) -> None:
    source = timm.create_model("fcvit_cifar")
    path = tmp_path / "fcvit_cifar.pth.tar"
    torch.save({"state_dict_ema": source.state_dict(), "epoch": 1}, path)
    loaded = timm.create_model("fcvit_cifar", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_forward_backward_tiny_224() -> None:
    torch.manual_seed(0)
    model = timm.create_model("fcvit_tiny")
    x = torch.randn(1, 3, 224, 224)
    feats = model.forward_features(x)
    assert feats.shape == (1, 320, 7, 7)
    out = model.forward_head(feats)
    assert out.shape == (1, 1000)
    out.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_forward_backward_cifar_32() -> None:
    torch.manual_seed(0)
    model = timm.create_model("fcvit_cifar")
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 256, 4, 4)
    out = model(x)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 7])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _randomised(name: str, seed: int = 0) -> torch.nn.Module:
    """Eval model with non-trivial per-head alpha/beta and layer scales that let every branch matter."""
    torch.manual_seed(seed)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GlobalContext):
                module.rescale_weight.uniform_(0.5, 2.0)
                module.rescale_bias.uniform_(-1.0, 1.0)
        for name_, p in model.named_parameters():
            if "layer_scale" in name_:
                p.uniform_(0.2, 0.6)
    return model


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return _randomised("fcvit_tiny")


def test_capture_names_and_shapes(tiny: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 64, 96)  # non-square: stages 16x24, 8x12, 4x6, 2x3
    with torch.no_grad():
        plain = tiny(x)
        with capturing() as maps:
            captured = tiny(x)
    assert torch.equal(plain, captured)
    sizes = {0: (16, 24), 2: (8, 12), 4: (4, 6), 6: (2, 3)}
    dims = {0: 32, 2: 64, 4: 160, 6: 320}
    depths = {0: 3, 2: 3, 4: 5, 6: 2}
    expected = []
    for s, depth in depths.items():
        for b in range(depth):
            for gc in ("gc1", "gc2"):
                for key in KEYS:
                    expected.append(f"network.{s}.{b}.token_mixer.{gc}.{key}")
    assert list(maps) == expected
    for name, value in maps.items():
        s = int(name.split(".")[1])
        h, w = sizes[s]
        channels = dims[s] if name.endswith(".context") else 8
        assert value.shape == (2, channels, h, w), name


def _reference_gc(gc: GlobalContext, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """GlobalContext math written out per head, with the official bottleneck reshape [B, 2, -1].max(1)."""
    b, c = x.shape[:2]
    d = c // 8
    g = x.mean(dim=(2, 3))
    sim = torch.stack(
        [(x[:, i * d:(i + 1) * d] * g[:, i * d:(i + 1) * d, None, None]).sum(dim=1) / math.sqrt(d) for i in range(8)],
        dim=1,
    )
    flat = sim.reshape(b, -1)
    norm = (sim - flat.mean(1).view(b, 1, 1, 1)) / (flat.std(1, unbiased=True).view(b, 1, 1, 1) + 1e-5)
    rescaled = torch.stack([gc.rescale_weight[i] * norm[:, i] + gc.rescale_bias[i] for i in range(8)], dim=1)
    hidden = F.linear(g, gc.fc1.weight, gc.fc1.bias).reshape(b, 2, -1).max(dim=1).values
    u = F.linear(hidden, gc.fc2.weight, gc.fc2.bias)
    context = rescaled.repeat_interleave(d, dim=1) * u[:, :, None, None]
    return {"similarity": sim, "similarity_norm": norm, "similarity_rescaled": rescaled, "context": context}


def test_capture_matches_independent_recomputation(tiny: torch.nn.Module) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), capturing() as maps:
        tiny(x)
        # Block inputs rebuilt by running the network's parts in order (no hooks).
        stem = tiny.patch_embed(x)
        inputs = {"network.0.0": stem}
        feat = stem
        for i in range(4):
            feat = tiny.network[i](feat)
        inputs["network.4.0"] = feat
        inputs["network.4.1"] = tiny.network[4][0](feat)
    for path, block_in in inputs.items():
        s, b = (int(t) for t in path.split(".")[1:])
        block = tiny.network[s][b]
        mixer = block.token_mixer
        with torch.no_grad():
            t = block.norm1(block_in)
            ref1 = _reference_gc(mixer.gc1, t)
            x2 = F.gelu(mixer.fc1(mixer.dw1(t + ref1["context"])))
            ref2 = _reference_gc(mixer.gc2, x2)
        for gc, ref in (("gc1", ref1), ("gc2", ref2)):
            for key in KEYS:
                got = maps[f"{path}.token_mixer.{gc}.{key}"]
                torch.testing.assert_close(got, ref[key], rtol=1e-4, atol=1e-4, msg=f"{path}.{gc}.{key}")


def test_normalised_and_rescaled_definitions(tiny: torch.nn.Module) -> None:
    torch.manual_seed(2)
    with torch.no_grad(), capturing() as maps:
        tiny(torch.randn(3, 3, 64, 64))
    for name, module in tiny.named_modules():
        if not isinstance(module, GlobalContext):
            continue
        norm = maps[f"{name}.similarity_norm"]
        flat = norm.flatten(1)
        if flat.shape[1] > 8:  # the 2x2 last stage still has 32 values per image
            torch.testing.assert_close(flat.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
            torch.testing.assert_close(flat.std(1, unbiased=True), torch.ones(3), atol=1e-3, rtol=0)
        alpha = module.rescale_weight.view(1, -1, 1, 1)
        beta = module.rescale_bias.view(1, -1, 1, 1)
        assert not torch.allclose(alpha, torch.ones_like(alpha))
        torch.testing.assert_close(maps[f"{name}.similarity_rescaled"], alpha * norm + beta)


def test_no_capture_leaves_no_state(tiny: torch.nn.Module) -> None:
    with torch.no_grad():
        tiny(torch.randn(1, 3, 32, 32))
    for module in tiny.modules():
        assert not any(isinstance(v, torch.Tensor) and k not in module._parameters and k not in module._buffers
                       for k, v in vars(module).items()), type(module).__name__


def test_two_threads_capture_only_their_own_maps() -> None:
    model = _randomised("fcvit_cifar", seed=3)
    inputs = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (10, 11)]
    with torch.no_grad():
        reference = []
        for x in inputs:
            with capturing() as maps:
                model(x)
            reference.append(dict(maps))
    assert any(not torch.allclose(reference[0][k], reference[1][k]) for k in reference[0])

    barrier = threading.Barrier(2)

    def worker(i: int) -> list[dict[str, torch.Tensor]]:
        out = []
        with torch.no_grad():
            for _ in range(3):
                barrier.wait(timeout=30)  # both threads inside forward at the same time
                with capturing() as maps:
                    model(inputs[i])
                out.append(dict(maps))
        return out

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(worker, i) for i in range(2)]
        results = [f.result(timeout=120) for f in futures]  # re-raises a worker's exception
    for i in range(2):
        assert len(results[i]) == 3
        for maps in results[i]:
            assert list(maps) == list(reference[i])
            for key, value in maps.items():
                torch.testing.assert_close(value, reference[i][key], rtol=1e-5, atol=1e-6)

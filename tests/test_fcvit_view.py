"""vizlib.fcvit_view: every number recomputed independently from the GlobalContext inputs (numpy)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import models  # noqa: F401  (registers the zoo)
from models.fcvit import GlobalContext
from vizlib import cli, fcvit_view
from vizlib.attention import analyse_attention
from vizlib.capture import attention_maps
from vizlib.images import SAMPLES_DIR, load_image, preprocess
from vizlib.weights import load_model

SAMPLE = SAMPLES_DIR / "cifar_cat.jpg"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """Random fcvit_cifar with non-trivial alpha/beta (1 and 0 would hide a swapped or missing rescale)."""
    torch.manual_seed(0)
    net = timm.create_model("fcvit_cifar").eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, GlobalContext):
                module.rescale_weight.copy_(torch.rand(module.rescale_weight.shape, generator=gen) * 2 - 0.5)
                module.rescale_bias.copy_(torch.randn(module.rescale_bias.shape, generator=gen))
    return net


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def hooked(model: torch.nn.Module, image: torch.Tensor) -> tuple[fcvit_view.FCViTAnalysis, dict[str, np.ndarray]]:
    """The analysis, and every GlobalContext's input grabbed by a hook (test-only model, so hooks are fine)."""
    inputs: dict[str, np.ndarray] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: inputs.__setitem__(name, args[0][0].detach().double().numpy()))
        for name, module in model.named_modules() if isinstance(module, GlobalContext)
    ]
    try:
        analysis = fcvit_view.analyse_fcvit(model, image)
    finally:
        for handle in handles:
            handle.remove()
    return analysis, inputs


def _softmax(values: np.ndarray) -> np.ndarray:
    e = np.exp(values - values.max())
    return e / e.sum()


def _gini(p: np.ndarray) -> float:
    a = np.sort(p)
    n = a.size
    return float(((2 * np.arange(1, n + 1) - n - 1) * a).sum() / n)


def test_every_module_is_found_in_execution_order(hooked: tuple) -> None:
    analysis, inputs = hooked
    assert [m.name for m in analysis.modules] == list(inputs)  # the hook order is the execution order
    assert len(analysis.modules) == 2 * 10  # fcvit_cifar: depths (2, 2, 4, 2), two modules per block
    assert analysis.blocks[0] == "network.0.0" and analysis.blocks[-1] == "network.6.1"
    assert fcvit_view.block_label("network.4.3") == "stage 3 · block 4"
    assert [m.grid for m in analysis.modules[::4]] == [(32, 32), (16, 16), (8, 8), (8, 8), (4, 4)]


def test_maps_equal_the_formulas_recomputed_from_the_module_input(model: torch.nn.Module, hooked: tuple) -> None:
    analysis, inputs = hooked
    for maps in analysis.modules:
        x = inputs[maps.name]  # (C, H, W)
        channels, height, width = x.shape
        heads, d = 8, channels // 8
        g = x.mean(axis=(1, 2))
        tokens = x.reshape(heads, d, height * width)
        s = (tokens * g.reshape(heads, d, 1)).sum(1) / math.sqrt(d)  # (heads, N)
        np.testing.assert_allclose(maps.similarity.numpy().reshape(heads, -1), s, rtol=1e-4, atol=1e-4)
        # S' from the *captured* S, then S'' = alpha S' + beta with the module's own parameters.
        captured = maps.similarity.double().numpy().reshape(heads, -1)
        s_norm = (captured - captured.mean()) / (captured.std(ddof=1) + 1e-5)
        np.testing.assert_allclose(maps.similarity_norm.numpy().reshape(heads, -1), s_norm, atol=1e-4)
        gc = model.get_submodule(maps.name)
        alpha = gc.rescale_weight.detach().double().numpy()[:, None]
        beta = gc.rescale_bias.detach().double().numpy()[:, None]
        rescaled = alpha * s_norm + beta
        np.testing.assert_allclose(maps.similarity_rescaled.numpy().reshape(heads, -1), rescaled, atol=1e-4)
        np.testing.assert_allclose(maps.rescale_weight.numpy(), alpha[:, 0], rtol=1e-6)
        # The context is S''_{h(c)} u_c: its channel norm is sqrt(sum_h S''_h^2 |u_h|^2).
        with torch.no_grad():
            u = gc.channel_context(torch.from_numpy(g).float()[None])[0].double().numpy()
        u_norm2 = (u.reshape(heads, d) ** 2).sum(1)
        context = np.sqrt((rescaled**2 * u_norm2[:, None]).sum(0)).reshape(height, width)
        np.testing.assert_allclose(maps.context.numpy(), context, rtol=1e-3, atol=1e-5)


def test_head_metrics_of_the_softmax_map(hooked: tuple) -> None:
    analysis, _ = hooked
    for maps in analysis.modules[::3]:
        rescaled = maps.similarity_rescaled.double().numpy().reshape(maps.num_heads, -1)
        positions = rescaled.shape[1]
        k = max(1, round(0.05 * positions))
        for head in range(maps.num_heads):
            p = _softmax(rescaled[head])
            np.testing.assert_allclose(maps.distribution[head].numpy().reshape(-1), p, atol=1e-6)
            expected = {
                "spatial_std": rescaled[head].std(ddof=1),
                "entropy": -(p * np.log(p)).sum() / math.log(positions),
                "topk_mass": np.sort(p)[::-1][:k].sum(),
                "gini": _gini(p),
            }
            for name, value in expected.items():
                assert float(maps.head_metrics[name][head]) == pytest.approx(value, rel=1e-4, abs=1e-6), name
        flat = [_softmax(r) for r in rescaled]
        cosines = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
                   for i, a in enumerate(flat) for j, b in enumerate(flat) if i != j]
        assert maps.head_independence == pytest.approx(np.mean(cosines), rel=1e-6)


def _pool(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = values.shape
    return values.reshape(size[0], h // size[0], size[1], w // size[1]).mean(axis=(1, 3))


def test_depth_trends(hooked: tuple) -> None:
    analysis, _ = hooked
    depth = analysis.depth
    assert math.isnan(depth["correlation_with_previous"][0])
    for index in range(1, len(analysis.modules)):
        a = analysis.modules[index - 1].similarity_rescaled.double().numpy().mean(0)
        b = analysis.modules[index].similarity_rescaled.double().numpy().mean(0)
        size = (min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1]))
        expected = np.corrcoef(_pool(a, size).ravel(), _pool(b, size).ravel())[0, 1]
        assert depth["correlation_with_previous"][index] == pytest.approx(expected, abs=1e-6)
    for maps, spread in zip(analysis.modules, depth["spatial_std"], strict=True):
        assert spread == pytest.approx(maps.similarity_rescaled.reshape(8, -1).std(dim=1).mean().item(), rel=1e-5)


def test_last_module_measured_like_vit_attention(hooked: tuple) -> None:
    """Every query shares the row softmax(S''): query-independence 1, the other metrics from that row."""
    analysis, _ = hooked
    last = analysis.modules[-1]
    assert last.grid == (4, 4) and last.stride == (8.0, 8.0)
    np.testing.assert_allclose(analysis.last["query_independence"].numpy(), 1.0, atol=1e-5)
    for name in ("entropy", "topk_mass", "gini"):
        np.testing.assert_allclose(analysis.last[name].numpy(), last.head_metrics[name].numpy(), atol=1e-5)
    centres = np.array([((r + 0.5) * 8, (c + 0.5) * 8) for r in range(4) for c in range(4)])
    distances = np.linalg.norm(centres[:, None] - centres[None], axis=-1)  # (query, key)
    for head in range(8):
        p = last.distribution[head].double().numpy().reshape(-1)
        expected = (distances * p[None]).sum(1).mean()
        assert float(analysis.last["mean_attention_distance"][head]) == pytest.approx(expected, rel=1e-5)


def test_comparison_with_vit_attention(hooked: tuple) -> None:
    analysis, _ = hooked
    torch.manual_seed(3)
    vit = timm.create_model("vit_cifar").eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    attention = analyse_attention(vit, x)
    comparison = fcvit_view.compare_with_vit(analysis, attention)
    _, layers = attention_maps(vit, x)
    attn = list(layers.values())[-1][0].double().numpy()[:, 1:, 1:]  # last layer, patches only
    rows = attn / attn.sum(-1, keepdims=True)
    unit = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    per_head = [(u @ u.T)[~np.eye(64, dtype=bool)].mean() for u in unit]
    assert comparison["vit"]["query_independence"] == pytest.approx(np.mean(per_head), rel=1e-4)
    assert comparison["fcvit"]["query_independence"] == pytest.approx(1.0, abs=1e-5)
    key_map = _pool(rows.mean(axis=(0, 1)).reshape(8, 8), (4, 4))
    shared = analysis.modules[-1].distribution.double().numpy().mean(0)
    expected = np.corrcoef(key_map.ravel(), shared.ravel())[0, 1]
    assert comparison["map_correlation"] == pytest.approx(expected, abs=1e-5)  # ViT rows are float32
    sentence = fcvit_view.comparison_sentence(comparison, "fcvit", "vit")
    assert f"{comparison['vit']['query_independence']:.2f}" in sentence and "1.00" in sentence


def test_a_model_without_global_context_is_refused() -> None:
    vit = timm.create_model("vit_cifar").eval()
    with pytest.raises(ValueError, match="no GlobalContext"):
        fcvit_view.analyse_fcvit(vit, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="one image"):
        fcvit_view.analyse_fcvit(vit, torch.zeros(2, 3, 32, 32))


def test_cli_json_equals_the_library_call(tmp_path: Path) -> None:
    out = tmp_path / "fcvit.json"
    assert cli.main(["fcvit", "--image", str(SAMPLE), "--maps", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())

    loaded, vit = load_model("fcvit_cifar"), load_model("vit_cifar")
    picture = load_image(SAMPLE)
    analysis = fcvit_view.analyse_fcvit(loaded.model, preprocess(picture, loaded.pretrained_cfg)[0])
    attention = analyse_attention(vit.model, preprocess(picture, vit.pretrained_cfg)[0])
    comparison = fcvit_view.compare_with_vit(analysis, attention)

    assert payload["model"] == "fcvit_cifar" and payload["input_size"] == [32, 32] and payload["num_heads"] == 8
    assert len(payload["modules"]) == len(analysis.modules)
    for entry, maps in zip(payload["modules"], analysis.modules, strict=True):
        assert entry["name"] == maps.name and entry["grid"] == list(maps.grid)
        np.testing.assert_allclose(entry["entropy"], maps.head_metrics["entropy"].numpy(), rtol=1e-6)
        np.testing.assert_allclose(entry["similarity_rescaled"], maps.similarity_rescaled.numpy(), rtol=1e-6)
        np.testing.assert_allclose(entry["context"], maps.context.numpy(), rtol=1e-6)
    for side in ("fcvit", "vit"):
        for name in fcvit_view.COMPARED:
            assert payload["comparison"][side][name] == pytest.approx(comparison[side][name], rel=1e-6)
    assert payload["comparison"]["map_correlation"] == pytest.approx(comparison["map_correlation"], rel=1e-6)
    assert payload["comparison"]["vit_model"] == "vit_cifar"


def test_cli_refuses_a_model_that_is_not_an_fcvit(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fcvit", "--model", "vit_cifar", "--image", str(SAMPLE), "--vit", "none"]) == cli.EXIT_BAD_INPUT
    assert "no GlobalContext" in capsys.readouterr().err

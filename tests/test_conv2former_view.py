"""vizlib.conv2former_view: group maps, footprints and the ViT side recomputed independently."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import models  # noqa: F401  (registers the zoo)
from models.capture import capturing
from models.conv2former import Conv2Former
from vizlib import cli, conv2former_view
from vizlib.attention import analyse_attention
from vizlib.capture import attention_maps
from vizlib.images import SAMPLES_DIR, load_image, preprocess
from vizlib.weights import load_model

SAMPLE = SAMPLES_DIR / "cifar_cat.jpg"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> Conv2Former:
    """Random conv2former_cifar with layer scales near 1 (1e-6 would make every block the identity)."""
    torch.manual_seed(0)
    net = timm.create_model("conv2former_cifar", drop_path_rate=0.0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("layer_scale_1", "layer_scale_2")):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
    return net


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def analysis(model: Conv2Former, image: torch.Tensor) -> conv2former_view.Conv2FormerAnalysis:
    return conv2former_view.analyse_conv2former(model, image, groups=5)


def test_group_maps_equal_a_manual_reduction(model: Conv2Former, image: torch.Tensor,
                                             analysis: conv2former_view.Conv2FormerAnalysis) -> None:
    with torch.no_grad(), capturing() as maps:
        model(image)
    names = [f"stages.{s}.{b}" for s, stage in enumerate(model.stages) for b in range(len(stage))]
    assert [b.name for b in analysis.blocks] == names
    for block in analysis.blocks:
        a = maps[f"{block.name}.attn.modulation"][0].double().numpy()
        v = maps[f"{block.name}.attn.value"][0].double().numpy()
        groups = np.array_split(np.arange(a.shape[0]), 5)  # 5 groups of consecutive channels
        assert block.group_sizes == [len(g) for g in groups]
        for kind, values in (("modulation", a), ("value", v), ("product", a * v)):
            expected = np.stack([np.abs(values[g]).mean(0) for g in groups])
            np.testing.assert_allclose(block.maps(kind).numpy(), expected, rtol=1e-4, atol=1e-6)
            whole = np.abs(values).mean(0)
            np.testing.assert_allclose(block.channel_mean(kind).numpy(), whole, rtol=1e-4, atol=1e-6)
            assert block.mean_abs[kind] == pytest.approx(np.abs(values).mean(), rel=1e-4)
            assert block.spatial_cv[kind] == pytest.approx(whole.std(ddof=1) / whole.mean(), rel=1e-3)


def test_kernel_side_from_the_depthwise_weights(model: Conv2Former,
                                                analysis: conv2former_view.Conv2FormerAnalysis) -> None:
    for block in analysis.blocks:
        w = np.abs(model.get_submodule(block.name).attn.att[2].weight.detach().double().numpy()).mean(axis=(0, 1))
        w /= w.sum()
        np.testing.assert_allclose(block.kernel.numpy(), w, rtol=1e-5)
        c = w.shape[0] // 2
        for t, side in block.kernel_side.items():
            masses = [w[c - i:c + i + 1, c - i:c + i + 1].sum() for i in range(c + 1)]
            assert side == 2 * next(i for i, m in enumerate(masses) if m >= t - 1e-9) + 1


def test_square_sides_area_and_distance_on_known_maps() -> None:
    delta = torch.zeros(11, 11)
    delta[5, 5] = 1.0
    footprint = conv2former_view.make_footprint("delta", 7, True, 0, "b", delta, (5.5, 5.5))
    assert footprint.side == {0.2: 1, 0.3: 1, 0.5: 1, 0.99: 1}
    assert footprint.area_ratio[0.5] == pytest.approx(1 / 121) and footprint.mean_distance == pytest.approx(0.0)
    block = torch.zeros(11, 11)
    block[4:7, 4:7] = 2.0
    footprint = conv2former_view.make_footprint("block", 7, True, 0, "b", block, (5.5, 5.5))
    assert footprint.side == {0.2: 3, 0.3: 3, 0.5: 3, 0.99: 3}  # the centre alone holds 1/9
    assert float(footprint.weights.sum()) == pytest.approx(1.0)
    expected = np.mean([math.hypot(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    assert footprint.mean_distance == pytest.approx(expected)
    # In a corner the square is clipped by the border: side 5 covers only 3 x 3 pixels.
    corner = torch.zeros(10, 10)
    corner[:3, :3] = 1.0
    footprint = conv2former_view.make_footprint("corner", 7, True, 0, "b", corner, (0.5, 0.5))
    assert footprint.side[0.99] == 5 and footprint.area_ratio[0.99] == pytest.approx(9 / 100)
    zero = conv2former_view.make_footprint("zero", 7, True, 0, "b", torch.zeros(4, 4), (2.0, 2.0))
    assert zero.side[0.5] == 0 and math.isnan(zero.mean_distance)


def test_footprint_equals_a_hooked_gradient(model: Conv2Former, image: torch.Tensor,
                                            analysis: conv2former_view.Conv2FormerAnalysis) -> None:
    """The same recipe through forward hooks on the stages' last blocks (fine on a test-only model)."""
    outputs: list[torch.Tensor] = []
    handles = [stage[-1].register_forward_hook(lambda _m, _i, out: outputs.append(out)) for stage in model.stages]
    x = image.clone().requires_grad_(True)
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    own = [f for f in analysis.footprints if f.trained]
    assert [f.stage for f in own] == [0, 1, 2, 3] and own[0].label == "this model (k=7)"
    for stage, out in enumerate(outputs):
        h, w = out.shape[-2:]
        score = torch.relu(out[0, :, h // 2, w // 2]).sum()
        (grad,) = torch.autograd.grad(score, x, retain_graph=True)
        expected = torch.relu(grad[0]).sum(0).double().numpy()
        expected /= expected.sum()
        np.testing.assert_allclose(own[stage].weights.numpy(), expected, rtol=1e-4, atol=1e-7)
        assert own[stage].centre == ((h // 2 + 0.5) * 32 / h, (w // 2 + 0.5) * 32 / w)
        assert own[stage].block == f"stages.{stage}.{len(model.stages[stage]) - 1}"


def test_random_copies_use_their_kernel_and_their_own_generator(model: Conv2Former) -> None:
    arch = conv2former_view.architecture(model)
    assert arch == ((2, 2, 6, 2), (48, 96, 160, 256), 4, 3, 1, 512)
    conv2former_view.random_copy.cache_clear()
    torch.manual_seed(123)
    first = conv2former_view.random_copy(arch, 11)
    conv2former_view.random_copy.cache_clear()
    torch.manual_seed(456)  # the global RNG must not matter
    second = conv2former_view.random_copy(arch, 11)
    assert first.stages[0][0].attn.att[2].weight.shape[-2:] == (11, 11)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert float(first.stages[2][3].layer_scale_1.min()) == conv2former_view.RANDOM_LAYER_SCALE
    seven = conv2former_view.random_copy(arch, 7)
    assert seven.stages[0][0].attn.att[2].weight.shape[-2:] == (7, 7)


def test_larger_random_kernel_reaches_further_in_the_first_stage() -> None:
    loaded = load_model("conv2former_cifar")
    x = preprocess(load_image(SAMPLE), loaded.pretrained_cfg)[0]
    result = conv2former_view.analyse_conv2former(loaded.model, x)
    by_label = {f.label: f for f in result.stage_footprints(0)}
    assert set(by_label) == {"this model (k=7)", "random init k=7", "random init k=11"}
    assert by_label["random init k=11"].mean_distance > by_label["random init k=7"].mean_distance


def test_vit_footprint_spreads_the_query_row_over_patch_pixels() -> None:
    torch.manual_seed(3)
    vit = timm.create_model("vit_cifar").eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    footprint = conv2former_view.vit_footprint(analyse_attention(vit, x), (32, 32), query=(2, 5), name="vit")
    _, layers = attention_maps(vit, x)
    attn = list(layers.values())[-1][0].double().numpy()[:, 1:, 1:]
    row = attn[:, 2 * 8 + 5]
    expected = (row / row.sum(-1, keepdims=True)).mean(0).reshape(8, 8)
    weights = footprint.weights.double().numpy()
    patches = weights.reshape(8, 4, 8, 4)
    np.testing.assert_allclose(patches.sum(axis=(1, 3)), expected, rtol=1e-4)
    assert np.allclose(patches, patches[:, :1, :, :1])  # even within a patch
    assert footprint.centre == (10.0, 22.0) and footprint.label == "vit attention, layer 8, query (2, 5)"
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    distance = (weights * np.hypot(ys - 10.0, xs - 22.0)).sum()
    assert footprint.mean_distance == pytest.approx(distance, rel=1e-5)


def test_a_model_that_is_not_a_conv2former_is_refused() -> None:
    with pytest.raises(ValueError, match="not a Conv2Former"):
        conv2former_view.analyse_conv2former(timm.create_model("vit_cifar"), torch.zeros(1, 3, 32, 32))


def test_cli_json_equals_the_library_call(tmp_path: Path) -> None:
    out = tmp_path / "conv2former.json"
    assert cli.main(["conv2former", "--image", str(SAMPLE), "--groups", "4", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())

    loaded, vit = load_model("conv2former_cifar"), load_model("vit_cifar")
    picture = load_image(SAMPLE)
    result = conv2former_view.analyse_conv2former(loaded.model, preprocess(picture, loaded.pretrained_cfg)[0],
                                                  groups=4)
    attention = analyse_attention(vit.model, preprocess(picture, vit.pretrained_cfg)[0])
    vit_print = conv2former_view.vit_footprint(attention, result.input_size)

    assert payload["kernel_size"] == 7 and payload["groups"] == 4 and payload["input_size"] == [32, 32]
    for entry, block in zip(payload["blocks"], result.blocks, strict=True):
        assert entry["name"] == block.name and entry["group_sizes"] == block.group_sizes
        for kind in conv2former_view.KINDS:
            assert entry["mean_abs"][kind] == pytest.approx(block.mean_abs[kind], rel=1e-6)
    assert len(payload["footprints"]) == 4 * 3
    for entry, footprint in zip(payload["footprints"], result.footprints, strict=True):
        assert entry["label"] == footprint.label and entry["stage"] == footprint.stage
        assert entry["side"] == {str(t): s for t, s in footprint.side.items()}
        assert entry["mean_distance_px"] == pytest.approx(footprint.mean_distance, rel=1e-6)
    assert payload["vit"]["side"] == {str(t): s for t, s in vit_print.side.items()}
    assert payload["vit"]["query_independence"] == pytest.approx(
        float(attention.layer_metrics[-1]["query_independence"].mean()), rel=1e-6)


def test_cli_rejects_bad_groups(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["conv2former", "--image", str(SAMPLE), "--groups", "0"]) == cli.EXIT_BAD_INPUT
    assert "--groups" in capsys.readouterr().err

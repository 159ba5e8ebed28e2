"""vizlib.mobile_former_view against independent recomputation from each bridge's own inputs.

The inputs of every bridge are taken with forward pre-hooks on a model private to this module (hooks
are fine here: no other caller shares it); the attention is then recomputed from the reference facts
(ARCHITECTURES.md section 2) in NumPy/torch without the module code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vizlib import cli, images
from vizlib import mobile_former_view as mfv
from vizlib.weights import LoadedModel, load_model

SAMPLE = images.SAMPLES_DIR / "cifar_cat.jpg"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundled() -> LoadedModel:
    return load_model("mobile_former_cifar")


@pytest.fixture(scope="module")
def image_input(bundled: LoadedModel) -> torch.Tensor:
    return images.preprocess(images.load_image(SAMPLE), bundled.pretrained_cfg)[0]


@pytest.fixture(scope="module")
def analysis(bundled: LoadedModel, image_input: torch.Tensor) -> mfv.MobileFormerAnalysis:
    return mfv.analyse_mobile_former(bundled.model, image_input)


@pytest.fixture(scope="module")
def bridge_inputs(image_input: torch.Tensor) -> dict[str, dict[str, tuple]]:
    """Per block name, the (x, tokens) each bridge received, from pre-hooks on a private copy."""
    model = load_model("mobile_former_cifar").model
    seen: dict[str, dict[str, tuple]] = {}
    handles = []
    for index, block in enumerate(model.features):
        if not hasattr(block, "local_global"):
            continue
        for part in ("local_global", "global_local"):
            def hook(_: nn.Module, args: tuple, name: str = f"features.{index}", part: str = part) -> None:
                seen.setdefault(name, {})[part] = tuple(a.detach().clone() for a in args)
            handles.append(getattr(block, part).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(image_input)
    for handle in handles:
        handle.remove()
    return seen


def _heads(module: nn.Module) -> int:
    return int(module.num_heads)


def l2g_reference(module: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    """softmax over H*W of Linear_q(Z) . X / sqrt(C/2), heads as contiguous channel halves: (2, T, H, W)."""
    _, c, h, w = x.shape
    heads = _heads(module)
    q = (tokens[0].double() @ module.q.weight.double().T + module.q.bias.double()).detach().numpy()  # (T, C)
    keys = x[0].double().reshape(c, h * w).numpy()
    out = []
    for head in range(heads):
        part = slice(head * c // heads, (head + 1) * c // heads)
        logits = q[:, part] @ keys[part] / math.sqrt(c // heads)
        logits -= logits.max(-1, keepdims=True)
        p = np.exp(logits)
        out.append((p / p.sum(-1, keepdims=True)).reshape(-1, h, w))
    return np.stack(out)


def g2l_reference(module: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    """softmax over T of X . Linear_k(Z) / sqrt(C/2), per pixel: (2, H, W, T)."""
    _, c, h, w = x.shape
    heads = _heads(module)
    k = (tokens[0].double() @ module.k.weight.double().T + module.k.bias.double()).detach().numpy()  # (T, C)
    pixels = x[0].double().reshape(c, h * w).numpy()
    out = []
    for head in range(heads):
        part = slice(head * c // heads, (head + 1) * c // heads)
        logits = pixels[part].T @ k[:, part].T / math.sqrt(c // heads)  # (HW, T)
        logits -= logits.max(-1, keepdims=True)
        p = np.exp(logits)
        out.append((p / p.sum(-1, keepdims=True)).reshape(h, w, -1))
    return np.stack(out)


def test_bridges_match_independent_recomputation(analysis: mfv.MobileFormerAnalysis, bundled: LoadedModel,
                                                 bridge_inputs: dict[str, dict[str, tuple]]) -> None:
    # every bridged block of the cifar config (features.0 is conv-only), in order
    assert analysis.block_names == [f"features.{i}" for i in range(1, 9)]
    assert analysis.num_tokens == 6 and analysis.num_heads == 2
    for block in analysis.blocks:
        module = bundled.model.get_submodule(block.name)
        x, tokens = bridge_inputs[block.name]["local_global"]
        np.testing.assert_allclose(block.l2g.numpy(), l2g_reference(module.local_global, x, tokens),
                                   rtol=1e-4, atol=1e-6)
        x, tokens = bridge_inputs[block.name]["global_local"]
        np.testing.assert_allclose(block.g2l.numpy(), g2l_reference(module.global_local, x, tokens),
                                   rtol=1e-4, atol=1e-6)
        # the recorded tokens are the ones the Mobile<-Former used (after the Former)
        torch.testing.assert_close(block.tokens, tokens[0])


def test_soft_maps_sum_to_one_and_argmax_is_the_recomputed_argmax(
    analysis: mfv.MobileFormerAnalysis, bundled: LoadedModel, bridge_inputs: dict[str, dict[str, tuple]]
) -> None:
    for index, block in enumerate(analysis.blocks):
        module = bundled.model.get_submodule(block.name).global_local
        reference = g2l_reference(module, *bridge_inputs[block.name]["global_local"])  # (2, H, W, T)
        for head in (None, 0, 1):
            soft = analysis.soft_assignment(index, head)
            assert soft.shape == (analysis.num_tokens, *block.g2l_grid)
            torch.testing.assert_close(soft.sum(0), torch.ones(block.g2l_grid))
            expected = reference.mean(0) if head is None else reference[head]
            got = analysis.assignment(index, head).numpy()
            # where two tokens tie to float precision either answer is right; elsewhere they agree
            top2 = np.sort(expected, -1)[..., -2:]
            clear = (top2[..., 1] - top2[..., 0]) > 1e-5
            np.testing.assert_array_equal(got[clear], expected.argmax(-1)[clear])
            shares = analysis.pixel_shares(index, head).numpy()
            np.testing.assert_allclose(shares, np.bincount(got.ravel(), minlength=6) / got.size)
            maps = analysis.token_maps(index, head)
            torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(analysis.num_tokens))


def test_centroid_entropy_and_overlap_against_numpy(analysis: mfv.MobileFormerAnalysis) -> None:
    centroids, entropy, overlap = analysis.centroids(), analysis.entropy(), analysis.map_overlap()
    for index, block in enumerate(analysis.blocks):
        p = block.l2g.double().mean(0).numpy()  # (T, H, W), head mean
        t, h, w = p.shape
        ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
        np.testing.assert_allclose(centroids[index, :, 0], (p * ys[:, None]).sum((1, 2)), atol=1e-6)
        np.testing.assert_allclose(centroids[index, :, 1], (p * xs[None, :]).sum((1, 2)), atol=1e-6)
        flat = p.reshape(t, -1)
        expected = -(flat * np.log(flat)).sum(-1) / math.log(h * w)
        np.testing.assert_allclose(entropy[index], expected, atol=1e-5)
        unit = flat / np.linalg.norm(flat, axis=-1, keepdims=True)
        cos = unit @ unit.T
        np.testing.assert_allclose(float(overlap[index]), cos[~np.eye(t, dtype=bool)].mean(), atol=1e-6)
    # the extremes: one pixel -> entropy 0 and its centre; uniform -> entropy 1 and the image centre
    one = torch.zeros(1, 4, 8)
    one[0, 3, 5] = 1.0
    assert float(mfv.map_entropy(one)[0]) == pytest.approx(0.0, abs=1e-9)
    assert mfv.map_centroid(one)[0].tolist() == pytest.approx([3.5 / 4, 5.5 / 8])
    uniform = torch.full((1, 4, 8), 1 / 32)
    assert float(mfv.map_entropy(uniform)[0]) == pytest.approx(1.0)
    assert mfv.map_centroid(uniform)[0].tolist() == pytest.approx([0.5, 0.5])


def test_token_similarity_across_blocks(analysis: mfv.MobileFormerAnalysis, bundled: LoadedModel) -> None:
    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    initial = bundled.model.tokens.weight.detach().double().numpy()
    previous = initial
    for index, block in enumerate(analysis.blocks):
        tokens = block.tokens.double().numpy()
        for i in range(6):
            assert float(analysis.token_drift[index, i]) == pytest.approx(cos(tokens[i], previous[i]), abs=1e-5)
            for j in range(6):
                assert float(analysis.token_similarity[index, i, j]) == pytest.approx(cos(tokens[i], tokens[j]),
                                                                                     abs=1e-5)
        previous = tokens
    cross = analysis.cross_block_similarity(2).numpy()
    stack = [initial[2]] + [b.tokens[2].double().numpy() for b in analysis.blocks]
    assert cross.shape == (9, 9)
    np.testing.assert_allclose(cross, [[cos(a, b) for b in stack] for a in stack], atol=1e-5)


def test_wrong_inputs_are_refused(bundled: LoadedModel) -> None:
    with pytest.raises(ValueError):
        mfv.analyse_mobile_former(bundled.model, torch.zeros(2, 3, 32, 32))
    with pytest.raises(TypeError):
        mfv.analyse_mobile_former(nn.Conv2d(3, 3, 1), torch.zeros(1, 3, 32, 32))


def test_figures_and_assignment_picture(analysis: mfv.MobileFormerAnalysis) -> None:
    crop = np.full((32, 32, 3), 128, dtype=np.uint8)
    picture = mfv.assignment_image(crop, analysis.assignment(7))
    assert picture.shape == (384, 384, 3) and picture.dtype == np.uint8
    fig = mfv.assignment_figure(analysis.assignment(7), 6)
    assert np.array_equal(np.asarray(fig.data[0].z), analysis.assignment(7).numpy())
    assert len(mfv.trajectory_figure(analysis).data) == 6
    assert mfv.matrix_figure(analysis.token_similarity[0], [str(t) for t in range(6)]).data[0].zmax == 1.0


def test_cli_json_matches_the_analysis(analysis: mfv.MobileFormerAnalysis, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mf.json"
    assert cli.main(["mobile-former", "--image", str(SAMPLE), "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["model"] == "mobile_former_cifar" and payload["num_tokens"] == 6 and payload["head"] == "mean"
    assert [b["name"] for b in payload["blocks"]] == analysis.block_names
    last = payload["blocks"][-1]
    assert last["l2g_grid"] == [4, 4] and last["g2l_grid"] == [4, 4]
    np.testing.assert_array_equal(last["assignment"], analysis.assignment(7).numpy())
    entropy = analysis.entropy()
    for index, block in enumerate(payload["blocks"]):
        assert [t["entropy"] for t in block["tokens"]] == pytest.approx(entropy[index].tolist(), abs=1e-6)
        assert sum(t["pixel_share"] for t in block["tokens"]) == pytest.approx(1.0)
    assert cli.main(["mobile-former", "--image", str(SAMPLE), "--head", "5"]) == cli.EXIT_BAD_INPUT
    assert "--head" in capsys.readouterr().err

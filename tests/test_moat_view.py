"""vizlib.moat_view: global vs window on one shared MOAT, checked against independent computations.

The gradients are recomputed here with ``torch.autograd.grad`` through the model's own modules
(stages and blocks called as the model calls them, window regions written out by hand), not through
the view's traced forward.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch

import models.moat as moat
from vizlib import cli, images
from vizlib import moat_view as mv
from vizlib.capture import capture_maps
from vizlib.weights import LoadedModel, load_model

SAMPLE = images.SAMPLES_DIR / "cifar_cat.jpg"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundled() -> LoadedModel:
    return load_model("moat_cifar")


@pytest.fixture(scope="module")
def image_input(bundled: LoadedModel) -> torch.Tensor:
    return images.preprocess(images.load_image(SAMPLE), bundled.pretrained_cfg)[0]


@pytest.fixture(scope="module")
def analysis(bundled: LoadedModel, image_input: torch.Tensor) -> mv.MoatAnalysis:
    return mv.analyse_moat(bundled.model, image_input, 4)  # 4x4 windows: 8x8 -> 4 windows, 4x4 -> global


def test_attention_in_both_modes_matches_capture_and_is_zero_across_windows(
    bundled: LoadedModel, image_input: torch.Tensor, analysis: mv.MoatAnalysis
) -> None:
    model = bundled.model
    assert analysis.block_names == ["stages.2.0", "stages.2.1", "stages.2.2", "stages.3.0", "stages.3.1"]
    assert [b.window for b in analysis.blocks] == [(4, 4)] * 5
    assert [b.window_is_global for b in analysis.blocks] == [False] * 3 + [True] * 2
    with torch.no_grad():
        _, global_maps = capture_maps(model, image_input)
        with moat.attention_mode(model, {2: 4, 3: 4}):
            _, window_maps = capture_maps(model, image_input)
    rows = torch.arange(8).repeat_interleave(8) // 4
    cols = torch.arange(8).repeat(8) // 4
    same = (rows[:, None] == rows[None]) & (cols[:, None] == cols[None])  # written out, not the view's mask
    for view in analysis.blocks:
        torch.testing.assert_close(view.attn_global, global_maps[f"{view.name}.attention.attn"][0])
        torch.testing.assert_close(view.attn_window, window_maps[f"{view.name}.attention.attn"][0])
        torch.testing.assert_close(view.attn_window.sum(-1), torch.ones(view.attn_window.shape[:-1]))
        assert view.cross_window_mass() == 0.0
        if view.grid == (8, 8):
            assert torch.all(view.attn_window[:, ~same] == 0)  # exactly zero across windows
            assert torch.all(view.attn_window[:, same] > 0)
            assert float(view.attn_global[:, ~same].sum(-1).max()) > 0.01  # global attention does cross
    # the query row as a map: row-major, head mean or one head
    q = (5, 2)
    expected = analysis.blocks[1].attn_window[:, 5 * 8 + 2].reshape(-1, 8, 8)
    torch.testing.assert_close(analysis.query_map(1, q, None, "window"), expected.mean(0))
    torch.testing.assert_close(analysis.query_map(1, q, 3, "global"),
                               analysis.blocks[1].attn_global[3, 42].reshape(8, 8))
    assert float(analysis.query_map(1, q, None, "window")[:4].sum()) == 0.0  # rows 0-3: another window
    assert analysis.block_query(3, (5, 2)) == (2, 1)  # 8x8 cell -> the 4x4 cell under it


def test_feature_differences_recomputed(bundled: LoadedModel, image_input: torch.Tensor,
                                        analysis: mv.MoatAnalysis) -> None:
    model = bundled.model
    outputs: dict[str, list[torch.Tensor]] = {}
    pooled: dict[str, torch.Tensor] = {}
    logits: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, spec in (("global", "global"), ("window", 4)):
            with moat.attention_mode(model, spec):
                h = model.stem(image_input)
                outputs[key] = []
                for stage in model.stages:  # the stages as the model calls them
                    h = stage(h)
                    outputs[key].append(h)
                pooled[key] = model.forward_head(h, pre_logits=True)
                logits[key] = model(image_input)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double().numpy(), b.double().numpy()
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    assert analysis.stage_difference[:2] == [0.0, 0.0]  # MBConv stages come before any attention
    for stage in range(4):
        assert analysis.stage_difference[stage] == pytest.approx(
            rel(outputs["window"][stage], outputs["global"][stage]), rel=1e-4, abs=1e-7)
    assert analysis.stage_difference[2] > 1e-3  # same weights, other mode: the features do move
    assert analysis.final_difference == pytest.approx(rel(pooled["window"], pooled["global"]), rel=1e-4)
    torch.testing.assert_close(analysis.logits_global, logits["global"][0])
    torch.testing.assert_close(analysis.logits_window, logits["window"][0])
    # the last block of each stage is the stage output
    assert analysis.blocks[2].feature_difference == pytest.approx(analysis.stage_difference[2], rel=1e-5)
    assert analysis.blocks[4].feature_difference == pytest.approx(analysis.stage_difference[3], rel=1e-5)


def test_split_block_equals_the_block(bundled: LoadedModel) -> None:
    block = bundled.model.stages[2][0]  # stride 2, width change: pooled + projected shortcut
    u = torch.randn(1, 128, 16, 16)
    mode = moat.AttentionMode("window", (4, 4))
    with torch.no_grad():
        a, y = mv._moat_block(block, u, mode)
        torch.testing.assert_close(y, block(u, mode))
        assert a.shape == (1, 192, 8, 8)


def _independent_shares(model: moat.Moat, x: torch.Tensor, spec: Any, block_name: str,
                        query: tuple[int, int], image_box: tuple[int, int, int, int],
                        input_box: tuple[int, int, int, int]) -> tuple[float, float]:
    """(image share, block-input share) outside hand-written boxes (y0, y1, x0, x1), by autograd."""
    stage_id, block_id = (int(p) for p in block_name.split(".")[1:])
    image = x.clone().requires_grad_(True)
    with moat.attention_mode(model, spec):
        mode = model.stages[stage_id].current_mode()
        h = model.stem(image)
        for stage in list(model.stages)[:stage_id]:
            h = stage(h)
        for block in list(model.stages[stage_id])[:block_id]:
            h = block(h, mode)
        y = model.stages[stage_id][block_id](h, mode)
    score = y[0, :, query[0], query[1]].norm()
    g_image, g_input = torch.autograd.grad(score, [image, h])

    def share(g: torch.Tensor, box: tuple[int, int, int, int]) -> float:
        mass = g[0].abs().sum(0).double()
        y0, y1, x0, x1 = box
        return float(1 - mass[y0:y1, x0:x1].sum() / mass.sum())

    return share(g_image, image_box), share(g_input, input_box)


@pytest.mark.parametrize("random_init", [False, True], ids=["bundled", "random"])
def test_outside_window_share_recomputed_with_autograd(bundled: LoadedModel, image_input: torch.Tensor,
                                                      random_init: bool) -> None:
    if random_init:
        torch.manual_seed(0)
        model = timm.create_model("moat_cifar", num_classes=10).eval()
    else:
        model = bundled.model
    query = (2, 5)  # 8x8 reference grid, 4x4 windows: rows 0-3, cols 4-7
    field = mv.receptive_field(model, image_input, 4, query)
    assert field.query == query and field.reference_grid == (8, 8)
    first = field.blocks[1]  # stages.2.1: 8x8 in and out
    assert first.name == "stages.2.1" and first.query == query and first.bounds == (0, 4, 4, 8)
    image_share, input_share = _independent_shares(model, image_input, 4, "stages.2.1", query,
                                                   image_box=(0, 16, 16, 32), input_box=(0, 4, 4, 8))
    shares = first.modes["window"].outside
    assert shares["image"] == pytest.approx(image_share, abs=1e-5)
    assert shares["block_input"] == pytest.approx(input_share, abs=1e-5)
    assert shares["attention_input"] == 0.0  # attention alone never leaves the window
    # the stride-2 block: 16x16 input, the window's cells are twice as many pixels on the input grid
    down = field.blocks[0]
    image_share, input_share = _independent_shares(model, image_input, 4, "stages.2.0", query,
                                                   image_box=(0, 16, 16, 32), input_box=(0, 8, 8, 16))
    assert down.modes["window"].outside["image"] == pytest.approx(image_share, abs=1e-5)
    assert down.modes["window"].outside["block_input"] == pytest.approx(input_share, abs=1e-5)
    # global mode, measured against the same window
    image_share, input_share = _independent_shares(model, image_input, "global", "stages.2.1", query,
                                                   image_box=(0, 16, 16, 32), input_box=(0, 4, 4, 8))
    assert first.modes["global"].outside["image"] == pytest.approx(image_share, abs=1e-5)
    assert first.modes["global"].outside["block_input"] == pytest.approx(input_share, abs=1e-5)
    assert first.modes["global"].outside["attention_input"] > 0.0
    # the maps themselves: mass is non-negative and the image map keeps the 32x32 resolution
    assert first.modes["window"].image.shape == (32, 32) and float(first.modes["window"].image.min()) >= 0
    # stage 3 (4x4 map, 4x4 window = the whole map): nothing can be outside
    assert all(v == 0.0 for b in field.blocks[3:] for m in b.modes.values() for v in m.outside.values())
    # only inputs were differentiated: the shared model's parameters have no .grad
    assert all(p.grad is None for p in model.parameters())


def test_helpers() -> None:
    assert mv.window_bounds((7, 7), (8, 8), (3, 3)) == (6, 8, 6, 8)  # ragged edge window
    assert mv.window_bounds((4, 1), (8, 8), (4, 4)) == (4, 8, 0, 4)
    assert mv.region_on((4, 8, 0, 4), (8, 8), (32, 32)) == (16, 32, 0, 16)
    assert mv.effective_window((4, 4), moat.AttentionMode("window", (7, 7))) == (4, 4)
    mass = torch.zeros(4, 4)
    mass[0, 0], mass[3, 3] = 3.0, 1.0
    assert mv.outside_share(mass, (0, 2, 0, 2)) == pytest.approx(0.25)
    picture = np.zeros((64, 64, 3), dtype=np.uint8)
    drawn = mv.draw_windows(picture, (8, 8), (4, 4), (0, 4, 4, 8))
    assert drawn[32, 5].tolist() == list(mv.WINDOW_COLOUR)  # the border between window rows
    assert drawn[10, 10].tolist() == [0, 0, 0]


def test_global_and_window_on_one_model_in_two_threads(bundled: LoadedModel, image_input: torch.Tensor) -> None:
    model = bundled.model
    specs = {"global": "global", "window": mv.window_spec(2)}
    expected = {key: mv.mode_pass(model, image_input, spec) for key, spec in specs.items()}
    assert not torch.equal(expected["global"].logits, expected["window"].logits)
    barrier = threading.Barrier(2)
    results: dict[str, list[mv.ModePass]] = {}
    errors: list[BaseException] = []

    def worker(key: str) -> None:
        try:
            barrier.wait()  # both start together and interleave their passes
            results[key] = [mv.mode_pass(model, image_input, specs[key]) for _ in range(3)]
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(key,)) for key in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for key, passes in results.items():
        for got in passes:
            torch.testing.assert_close(got.logits, expected[key].logits)
            assert list(got.attn) == list(expected[key].attn)
            for name in got.attn:
                torch.testing.assert_close(got.attn[name], expected[key].attn[name])
            assert all(m.mode == key for m in got.modes.values())
    # and the shared model itself was never switched
    assert model.attention_modes() == {2: moat.GLOBAL, 3: moat.GLOBAL}


def test_wrong_inputs_are_refused(bundled: LoadedModel, image_input: torch.Tensor) -> None:
    with pytest.raises(TypeError):
        mv.analyse_moat(torch.nn.Conv2d(3, 3, 1), image_input)
    with pytest.raises(ValueError):
        mv.receptive_field(bundled.model, image_input, 4, (8, 0))


def test_cli_json(bundled: LoadedModel, image_input: torch.Tensor, tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "moat.json"
    assert cli.main(["moat", "--image", str(SAMPLE), "--window", "4", "--query", "2", "5",
                     "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["window"] == "4×4" and payload["query"] == [2, 5] and payload["reference_grid"] == [8, 8]
    field = mv.receptive_field(bundled.model, image_input, 4, (2, 5))
    assert [b["name"] for b in payload["blocks"]] == [b.name for b in field.blocks]
    for entry, block in zip(payload["blocks"], field.blocks, strict=True):
        assert entry["query"] == list(block.query)
        assert entry["cross_window_attention"] == 0.0
        for mode in ("window", "global"):
            assert entry["outside_window_share"][mode] == pytest.approx(block.modes[mode].outside, abs=1e-6)
    assert payload["stage_difference"][:2] == [0.0, 0.0]
    assert cli.main(["moat", "--image", str(SAMPLE), "--query", "9", "0"]) == cli.EXIT_BAD_INPUT
    assert "outside the 8x8 grid" in capsys.readouterr().err

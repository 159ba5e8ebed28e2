"""Effective receptive field: the batched ERF equals the one-image-at-a-time recipe, the CLI agrees with an
independent implementation of METHODS.md section 7 written here, and the area ratios give known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import models  # noqa: F401  (registers the zoo)
from vizlib import cli, erf, images
from vizlib.weights import load_model

SAMPLES = images.SAMPLES_DIR
CIFAR_SAMPLES = ["cifar_airplane.jpg", "cifar_cat.jpg", "cifar_ship.jpg", "cifar_dog.jpg"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cetnet(seed: int = 0) -> nn.Module:
    """A 0.3M-parameter CETNet (stem, CEs of depth 2, LEWin blocks, BatchNorm): every kind of layer, fast."""
    torch.manual_seed(seed)
    return timm.create_model("cetnet_cifar", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                             stem_chs=(8, 8), ce_depth=2).eval()


def max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the difference measured against the map's own scale."""
    return float((a - b).abs().max() / b.abs().max())


# --- an independent implementation of the recipe (METHODS.md section 7) ---------------------------


def reference_erf(model: nn.Module, batch: torch.Tensor) -> np.ndarray:
    """Per image: s = sum_c ReLU(out[:, c, H//2, W//2]); g = ReLU(ds/dx); sum over batch and RGB; skip NaN;
    running mean (RepLKNet's AverageMeter: sum / count)."""
    total, count = None, 0
    for i in range(batch.shape[0]):
        x = batch[i:i + 1].clone().requires_grad_(True)
        out = model.forward_features(x)
        central = torch.relu(out[:, :, out.shape[2] // 2, out.shape[3] // 2]).sum()
        grad = torch.relu(torch.autograd.grad(central, x)[0])
        contribution = grad.sum((0, 1)).double().numpy()
        if np.isnan(np.sum(contribution)):
            continue
        total = contribution if total is None else total + contribution
        count += 1
    assert total is not None
    return total / count


def reference_ratios(erf_map: np.ndarray) -> dict[str, float]:
    """d = log10(map + 1) / max; smallest centred square 2i+1 (i = 1 .. H/2 - 1) with sum/sum(d) > t."""
    data = np.log10(erf_map + 1)
    data = data / np.max(data)
    h, w = data.shape
    ratios = {}
    for t in (0.2, 0.3, 0.5, 0.99):
        ratio = 1.0  # no square smaller than the input exceeds t
        for i in range(1, h // 2):
            square = data[h // 2 - i:h // 2 + 1 + i, w // 2 - i:w // 2 + 1 + i]
            if np.sum(square) / np.sum(data) > t:
                ratio = (i * 2 + 1) / h * (i * 2 + 1) / w
                break
        ratios[str(t)] = ratio
    return ratios


def cifar_batch(names: list[str], mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """32x32 samples normalised by hand (at 32 px with crop_pct 1 timm's eval transform is the identity)."""
    arrays = []
    for name in names:
        pixels = np.asarray(Image.open(SAMPLES / name).convert("RGB"), dtype=np.float32) / 255.0
        assert pixels.shape == (32, 32, 3)
        arrays.append((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --- batched == sequential ---------------------------------------------------------------------------


def test_batched_equals_sequential_in_float64_exactly() -> None:
    # Exact algebra: in eval mode the batch-summed objective's gradient is each sample's own gradient.
    model = tiny_cetnet().double()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batched = erf.erf_map(model, x, batch_size=2)  # 2 + 2 + 1: a ragged last batch too
    sequential = erf.erf_map_sequential(model, x)
    assert batched.shape == (32, 32)
    assert max_relative(batched, sequential) < 1e-12
    assert max_relative(sequential, torch.from_numpy(reference_erf(model, x))) < 1e-12


def test_batched_equals_sequential_in_float32_to_1e_5() -> None:
    model = tiny_cetnet()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert max_relative(erf.erf_map(model, x, batch_size=4), erf.erf_map_sequential(model, x)) < 1e-5


def test_train_mode_is_refused() -> None:
    # Train-mode BatchNorm mixes samples, so the batched gradients would not be per-image ones.
    with pytest.raises(ValueError, match="eval mode"):
        erf.erf_map(tiny_cetnet().train(), torch.randn(2, 3, 32, 32))


def test_nan_images_are_skipped_per_image_inside_a_batch() -> None:
    model = tiny_cetnet()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    poisoned = x.clone()
    poisoned[1, 0, 5, 5] = float("nan")
    result = erf.erf_accumulate(model, poisoned, batch_size=4)  # the NaN image shares the batch
    assert (result.n_used, result.n_skipped, result.skipped) == (3, 1, [1])
    clean = erf.erf_map(model, x[[0, 2, 3]], batch_size=4)
    assert torch.isfinite(result.map).all()
    assert max_relative(result.map, clean) < 1e-5
    assert max_relative(erf.erf_map_sequential(model, poisoned), clean) < 1e-5
    with pytest.raises(ValueError, match="NaN"):
        erf.erf_map(model, torch.full((2, 3, 32, 32), float("nan")))


def test_progress_and_cancel() -> None:
    model = tiny_cetnet()
    x = torch.randn(3, 3, 32, 32)
    seen: list[float] = []
    erf.erf_map(model, x, batch_size=2, progress=seen.append)
    assert seen == [2 / 3, 1.0]
    calls: list[int] = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 1  # let the first batch run, stop before the second

    with pytest.raises(erf.ErfCancelled):
        erf.erf_map(model, x, batch_size=2, cancel=cancel)
    with pytest.raises(erf.ErfCancelled):
        erf.erf_map_sequential(model, x, cancel=lambda: True)


# --- ViT token maps --------------------------------------------------------------------------------


def test_vit_features_drop_prefix_tokens_and_use_the_patch_grid() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, reg_tokens=2,
                            num_classes=0).eval()
    assert vit.num_prefix_tokens == 3  # CLS + 2 registers
    x = torch.randn(2, 3, 16, 16)
    tokens = vit.forward_features(x)
    expected = tokens[:, 3:, :].reshape(2, 4, 4, 16).permute(0, 3, 1, 2)
    assert torch.equal(erf.default_features(vit, x), expected)


@pytest.mark.parametrize(("size", "patch_box"), [(16, (8, 12)), (24, (12, 16))])
def test_vit_erf_without_blocks_is_exactly_the_centre_patch(size: int, patch_box: tuple[int, int]) -> None:
    # No transformer blocks: a patch token sees only its own pixels, so the ERF must be the centre patch
    # (row h//2, column w//2 of the patch grid) and nothing else -- wrong prefix or grid handling moves it.
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=0, num_heads=2, class_token=True,
                            reg_tokens=1, num_classes=0, dynamic_img_size=True).eval()
    result = erf.erf_map(vit, torch.randn(3, 3, size, size))
    support = torch.nonzero(result > 0)
    lo, hi = patch_box
    assert support.min().item() >= lo and support.max().item() <= hi - 1
    assert bool((result[lo:hi, lo:hi] > 0).any())


# --- analysis on synthetic maps ----------------------------------------------------------------------


def test_log_normalised_known_values() -> None:
    d = erf.log_normalised(torch.tensor([[0.0, 9.0], [99.0, 999.0]]))
    assert torch.allclose(d, torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]], dtype=torch.float64))
    assert torch.equal(erf.log_normalised(torch.zeros(3, 3)), torch.zeros(3, 3, dtype=torch.float64))


def test_area_ratios_of_a_centre_delta_are_the_smallest_square() -> None:
    delta = torch.zeros(32, 32)
    delta[16, 16] = 5.0
    assert erf.area_ratios(delta) == {t: 9 / 1024 for t in (0.2, 0.3, 0.5, 0.99)}


def test_area_ratios_of_a_uniform_map() -> None:
    # Fraction in a square of side s is s^2 / 1024; the first odd s above t: 15, 19, 23; none for 0.99.
    ratios = erf.area_ratios(torch.full((32, 32), 7.0))
    assert ratios == {0.2: 225 / 1024, 0.3: 361 / 1024, 0.5: 529 / 1024, 0.99: 1.0}
    assert erf.square_sides(torch.full((32, 32), 7.0)) == {0.2: 15, 0.3: 19, 0.5: 23, 0.99: 32}


def test_area_ratios_of_a_centred_block() -> None:
    # d = 1 on a centred 9x9 block, 0 elsewhere: fractions 9/81, 25/81, 49/81, 81/81 for sides 3, 5, 7, 9.
    block = torch.zeros(32, 32)
    block[12:21, 12:21] = 3.0
    assert erf.area_ratios(block) == {0.2: 25 / 1024, 0.3: 25 / 1024, 0.5: 49 / 1024, 0.99: 81 / 1024}
    assert all(math.isnan(r) for r in erf.area_ratios(torch.zeros(8, 8)).values())


# --- the command line against the independent implementation ----------------------------------------


def run_cli(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "erf.json"
    assert cli.main(["erf", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_cli_bundled_ce_depth_matches_the_independent_recipe(tmp_path: Path) -> None:
    paths = [str(SAMPLES / name) for name in CIFAR_SAMPLES]
    payload = run_cli(tmp_path, "--model", "cetnet_cifar", "--ce-depth", "3", "--images", *paths, "--n", "3")
    assert payload["weights"].startswith("bundled checkpoint cetnet_cifar_ce3")
    assert (payload["n_images"], payload["size"], payload["images"]) == (3, 32, paths[:3])

    loaded = load_model("cetnet_cifar_ce3", "bundled")
    assert loaded.model.ce_depth == 3
    cfg = loaded.pretrained_cfg
    expected = reference_erf(loaded.model, cifar_batch(CIFAR_SAMPLES[:3], cfg["mean"], cfg["std"]))
    got = np.asarray(payload["map"])
    assert got.shape == (32, 32)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4
    assert payload["area_ratio"] == pytest.approx(reference_ratios(expected), abs=1e-4)
    assert set(payload["area_ratio"]) == {"0.2", "0.3", "0.5", "0.99"}


def test_cli_init_weights_are_seeded_and_match_the_recipe(tmp_path: Path) -> None:
    paths = [str(SAMPLES / name) for name in CIFAR_SAMPLES[:2]]
    payload = run_cli(tmp_path, "--model", "cetnet_cifar", "--weights", "init", "--ce-depth", "1",
                      "--images", *paths, "--batch-size", "2")
    assert payload["weights"] == "random initialisation (seed 0)"
    torch.manual_seed(0)
    model = timm.create_model("cetnet_cifar", ce_depth=1).eval()
    cfg = model.pretrained_cfg
    expected = reference_erf(model, cifar_batch(CIFAR_SAMPLES[:2], cfg["mean"], cfg["std"]))
    got = np.asarray(payload["map"])
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4
    assert payload["area_ratio"] == pytest.approx(reference_ratios(expected), abs=1e-4)


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = str(SAMPLES / CIFAR_SAMPLES[0])
    assert cli.main(["erf", "--model", "cetnet_cifar", "--images", image, "--n", "2"]) == cli.EXIT_BAD_INPUT
    assert "more images than the 1 given" in capsys.readouterr().err
    assert cli.main(["erf", "--model", "cetnet_cifar", "--ce-depth", "2", "--images", image]) == cli.EXIT_BAD_INPUT
    assert "no bundled checkpoint" in capsys.readouterr().err
    missing = str(tmp_path / "missing.png")
    assert cli.main(["erf", "--model", "resnet_cifar", "--images", missing]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


# --- figures and sentences -------------------------------------------------------------------------


def test_erf_figure_draws_log_scaled_maps_with_the_half_mass_square() -> None:
    from vizlib import erf_figures

    block = torch.zeros(32, 32)
    block[12:21, 12:21] = 99.0  # log10(100) = 2 -> 1 after dividing by the max
    fig = erf_figures.erf_figure([[block, None], [torch.full((32, 32), 9.0), block]],
                                 row_titles=["trained", "init"], col_titles=["CE 1", "CE 3"])
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 3  # the None cell stays empty
    assert np.asarray(heatmaps[0].z).max() == 1.0 and np.asarray(heatmaps[0].z)[0, 0] == 0.0
    # t = 0.5 on the 9x9 block is the 7x7 square: pixels 13..19, drawn from 12.5 to 19.5
    square = fig.layout.shapes[0]
    assert (square.x0, square.x1, square.y0, square.y1) == (12.5, 19.5, 12.5, 19.5)
    assert fig.layout.coloraxis.cmin == 0.0 and fig.layout.coloraxis.cmax == 1.0


def test_area_ratio_figure_and_sentences() -> None:
    from vizlib import erf_figures

    ratios = {
        "trained": {"CE 1": {0.5: 0.20, 0.99: 1.0}, "CE 3": {0.5: 0.41, 0.99: 1.0}, "CE 5": {0.5: 0.41, 0.99: 1.0}},
        "at initialisation": {"CE 1": {0.5: 0.11, 0.99: 0.4}, "CE 3": {0.5: 0.13, 0.99: 0.9}},
    }
    fig = erf_figures.area_ratio_figure(ratios)
    assert len(fig.data) == 4  # 2 series x 2 thresholds
    assert list(fig.data[0].y) == [0.20, 0.41, 0.41]
    sentence = erf_figures.depth_sentence(ratios, 0.5)
    assert "trained it grows (CE 1: 0.20 → CE 3: 0.41 → CE 5: 0.41)" in sentence
    assert "at initialisation it grows (CE 1: 0.11 → CE 3: 0.13)" in sentence
    flat = {"trained": {"CE 1": {0.5: 0.43}, "CE 3": {0.5: 0.52}, "CE 5": {0.5: 0.43}}}
    assert "goes up and down" in erf_figures.depth_sentence(flat, 0.5)
    assert "(widest: CE 3)" in erf_figures.models_sentence(flat, 0.5)

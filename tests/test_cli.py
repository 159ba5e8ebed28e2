"""python -m vizlib: JSON of the attention command recomputed independently from timm's AttentionExtract."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.utils import AttentionExtract

from vizlib.images import load_image, preprocess
from vizlib.weights import load_model

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "assets" / "samples" / "cifar_cat.jpg"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vizlib", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def independent_layer(a: np.ndarray, p: int, grid: tuple[int, int], patch: int) -> dict:
    """Per-head metrics from one (heads, N, N) map, written from the issue's definitions in NumPy."""
    block = a[:, p:, p:].astype(np.float64)
    block /= block.sum(-1, keepdims=True)
    heads, n, _ = block.shape
    k = max(1, round(0.05 * n))
    ys, xs = np.divmod(np.arange(n), grid[1])
    centres = np.stack([(ys + 0.5) * patch, (xs + 0.5) * patch], 1)
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    unit = block / np.linalg.norm(block, axis=-1, keepdims=True)
    out = []
    for h in range(heads):
        cos = unit[h] @ unit[h].T
        srt = np.sort(block[h], axis=-1)
        ranks = 2 * np.arange(1, n + 1) - n - 1
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.where(block[h] > 0, block[h] * np.log(block[h]), 0).sum(-1) / math.log(n)
        out.append({
            "query_independence": cos[np.triu_indices(n, 1)].mean(),
            "entropy": ent.mean(),
            "topk_mass": srt[:, -k:].sum(-1).mean(),
            "gini": ((srt * ranks).sum(-1) / n).mean(),
            "mean_attention_distance": (block[h] * dist).sum(-1).mean(),
        })
    pairs = [unit[h, i] @ unit[g, i] for i in range(n) for h in range(heads) for g in range(h + 1, heads)]
    return {"heads": out, "head_independence": float(np.mean(pairs))}


@pytest.mark.parametrize("model_name", ["vit_cifar", "deit_cifar_distilled"])
def test_attention_json_matches_attention_extract(model_name: str, tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    result = run_cli("attention", "--model", model_name, "--image", str(SAMPLE), "--json", str(out))
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())

    loaded = load_model(model_name)
    model = loaded.model
    for module in model.modules():  # timm's extractor needs the unfused softmax
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    x = preprocess(load_image(SAMPLE), loaded.pretrained_cfg)[0]
    with torch.no_grad():
        reference = AttentionExtract(model, method="fx")(x)
    prefix = model.num_prefix_tokens
    grid = tuple(model.patch_embed.grid_size)
    patch = model.patch_embed.patch_size[0]

    assert payload["model"] == model_name
    assert payload["num_prefix_tokens"] == prefix == (2 if "distilled" in model_name else 1)
    assert payload["grid"] == list(grid)
    assert len(payload["layers"]) == len(reference) == len(model.blocks)
    for depth, (layer, attn) in enumerate(zip(payload["layers"], reference.values(), strict=True)):
        assert layer["name"] == f"blocks.{depth}.attn"
        expected = independent_layer(attn[0].numpy(), prefix, grid, patch)
        assert layer["head_independence"] == pytest.approx(expected["head_independence"], abs=1e-4)
        for got, want in zip(layer["heads"], expected["heads"], strict=True):
            for metric, value in want.items():
                assert got[metric] == pytest.approx(value, abs=1e-4), (depth, metric)

    # Rollout: R = Π rownorm(½(Ā + I)) in forward order, CLS row over patches.
    n = prefix + grid[0] * grid[1]
    rollout = np.eye(n)
    for attn in reference.values():
        a = 0.5 * attn[0].double().numpy().mean(0) + 0.5 * np.eye(n)
        rollout = (a / a.sum(-1, keepdims=True)) @ rollout
    np.testing.assert_allclose(np.array(payload["rollout"]).ravel(), rollout[0, prefix:], atol=1e-4)


def test_models_json_lists_zoo_and_sources() -> None:
    result = run_cli("models", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    by_name = {entry["name"]: entry["sources"] for entry in payload["models"]}
    for name in ("vit_cifar", "fcvit_tiny", "mobile_former_508m", "moat_0", "conv2former_n", "cetnet_t"):
        assert name in by_name
    assert "bundled" in by_name["vit_cifar"] and "file" in by_name["fcvit_tiny"]
    assert "hub" in by_name["deit_base_distilled_patch16_224.fb_in1k"]
    bundled = {entry["checkpoint_id"] for entry in payload["bundled"]}
    assert {"vit_cifar", "deit_cifar_distilled"} <= bundled


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["attention", "--model", "vit_cifar", "--image", "missing.png"], "missing.png"),
        (["attention", "--model", "vit_cifar", "--image", str(ROOT / "README.md")], "not an image"),
        (["attention", "--model", "no_such_model", "--image", str(SAMPLE)], "no_such_model"),
        (["attention", "--model", "vit_cifar", "--weights", "nope.safetensors", "--image", str(SAMPLE)], "nope"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert message.lower() in lines[0].lower()

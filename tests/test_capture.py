"""Attention capture: equal to timm's AttentionExtract, prefix-token aware, and per-thread."""

from __future__ import annotations

import threading

import pytest
import timm
import torch
from timm.utils import AttentionExtract

import models  # noqa: F401  (registers the zoo)
from models.capture import capturing, record
from vizlib.attention import analyse_attention
from vizlib.capture import attention_maps, num_prefix_tokens, patch_geometry


def small_vit(name: str = "vit_tiny_patch16_224", **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, depth=3, num_classes=10, **kwargs)
    return timm.create_model(name, **args).eval()




@pytest.mark.parametrize(
    ("name", "kwargs", "prefix"),
    [
        ("vit_tiny_patch16_224", {}, 1),
        ("deit_tiny_distilled_patch16_224", {}, 2),
        ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),
        ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0),
    ],
)
@pytest.mark.parametrize("method", ["fx", "hook"])
def test_capture_equals_timm_attention_extract(name: str, kwargs: dict, prefix: int, method: str) -> None:
    model = small_vit(name, **kwargs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected_logits = model(x)
        output, maps = attention_maps(model, x)
    torch.testing.assert_close(output, expected_logits, atol=1e-5, rtol=1e-5)
    assert num_prefix_tokens(model) == prefix
    assert list(maps) == [f"blocks.{i}.attn" for i in range(3)]

    for module in model.modules():  # an unfused twin for timm's extractor
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    extractor = AttentionExtract(model, method=method)
    with torch.no_grad():
        reference = extractor(x)
    assert len(reference) == len(maps)
    for (_, ours), theirs in zip(maps.items(), reference.values(), strict=True):
        assert ours.shape == (2, 3, prefix + 16, prefix + 16)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_patch_geometry_uses_the_patch_embedding_not_sqrt() -> None:
    model = small_vit("deit_tiny_distilled_patch16_224")
    grid, patch = patch_geometry(model, torch.zeros(1, 3, 32, 32))
    assert grid == (4, 4) and patch == (8, 8)
    wide = small_vit(dynamic_img_size=True)
    x = torch.randn(1, 3, 32, 48)
    analysis = analyse_attention(wide, x)
    assert analysis.grid == (4, 6)
    assert analysis.rollout.shape == (4, 6)


def test_two_threads_on_one_model_get_their_own_maps() -> None:
    model = small_vit()
    inputs = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with torch.no_grad():
        expected = [attention_maps(model, x)[1] for x in inputs]
    results: dict[int, list] = {}
    barrier = threading.Barrier(4)

    def work(index: int) -> None:
        barrier.wait()
        got = []
        for _ in range(5):
            with torch.no_grad():
                got.append(attention_maps(model, inputs[index])[1])
        results[index] = got

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(4):
        for maps in results[index]:
            assert list(maps) == list(expected[index])
            for name in maps:
                torch.testing.assert_close(maps[name], expected[index][name])


def test_nothing_is_recorded_outside_a_capture_and_nothing_left_behind() -> None:
    model = small_vit()
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with torch.no_grad():
        attention_maps(model, torch.randn(1, 3, 32, 32))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    record(model, "stray", torch.zeros(1))  # no active capture: a no-op, no error
    with capturing() as maps:
        pass
    assert not maps


def test_nested_capture_is_isolated() -> None:
    model = small_vit()
    with capturing() as outer:
        with torch.no_grad():
            _, inner = attention_maps(model, torch.randn(1, 3, 32, 32))
    assert len(inner) == 3 and not outer

"""Benchmarks that print ratios against a plain forward pass, measured in one run.

    python scripts/bench.py [--repeats 7] [--only attention|erf]

attention: capture + all metrics + rollout (``vizlib.attention.analyse_attention``) against a plain
timm forward of the same model and input (random weights: the timing does not depend on them).
Target (issue #2): at most 1.3x for vit_base_patch16_224 at 224 on a 2-core CPU.

erf: time per image of the batched ERF (``vizlib.erf.erf_map``, one backward per batch) against the
one-image-at-a-time RepLKNet recipe (``erf_map_sequential``), same bundled model, size and 16 images, and the
max relative difference of the two maps (max |a - b| / max |b|). Targets: at least 2x faster, within 1e-5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models  # noqa: E402,F401  (registers the zoo)
from vizlib import erf  # noqa: E402
from vizlib.attention import analyse_attention  # noqa: E402
from vizlib.images import list_samples, load_image  # noqa: E402

ATTENTION_MODELS = [
    ("vit_base_patch16_224", 224),
    ("deit_base_distilled_patch16_224", 224),
    ("vit_cifar", 32),
]


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, runs interleaved so machine noise hits all alike."""
    for fn in fns.values():  # warm-up: allocator, thread pool, lazy inits
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_attention(repeats: int) -> None:
    print(f"attention capture + metrics vs plain forward (torch threads: {torch.get_num_threads()})")
    for name, size in ATTENTION_MODELS:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        x = torch.randn(1, 3, size, size)

        def plain(model: torch.nn.Module = model, x: torch.Tensor = x) -> object:
            with torch.inference_mode():
                return model(x)

        medians = interleaved_medians(
            {"plain": plain, "analyse": lambda model=model, x=x: analyse_attention(model, x)}, repeats
        )
        ratio = medians["analyse"] / medians["plain"]
        print(
            f"  {name:34s} {size}px  plain {medians['plain'] * 1e3:8.1f} ms  "
            f"capture+metrics {medians['analyse'] * 1e3:8.1f} ms  ratio {ratio:.2f}x"
        )


ERF_MODELS = [("cetnet_cifar_ce5", 32), ("cetnet_cifar_ce5", 64)]
ERF_IMAGES = 16
ERF_BATCH = 8


def erf_images(pretrained_cfg: dict, size: int, count: int) -> torch.Tensor:
    """``count`` bundled samples at ``size`` px; mirrored copies fill up when there are fewer samples."""
    x = erf.prepare_images([load_image(p) for p in list_samples()], pretrained_cfg, size)
    while x.shape[0] < count:
        x = torch.cat([x, x.flip(-1)])
    return x[:count]


def bench_erf(repeats: int) -> None:
    print(f"ERF: batched (batch {ERF_BATCH}, one backward per batch) vs the one-image recipe, "
          f"{ERF_IMAGES} images (torch threads: {torch.get_num_threads()})")
    for name, size in ERF_MODELS:
        loaded = erf.load_erf_model(name, "bundled", size=size)
        x = erf_images(loaded.pretrained_cfg, size, ERF_IMAGES)

        def batched(model: torch.nn.Module = loaded.model, x: torch.Tensor = x) -> torch.Tensor:
            return erf.erf_map(model, x, batch_size=ERF_BATCH)

        def sequential(model: torch.nn.Module = loaded.model, x: torch.Tensor = x) -> torch.Tensor:
            return erf.erf_map_sequential(model, x)

        medians = interleaved_medians({"sequential": sequential, "batched": batched}, repeats)
        reference = sequential()
        # Relative to the map's own scale: max |batched - sequential| / max |sequential|.
        diff = float((batched() - reference).abs().max() / reference.abs().max())
        speedup = medians["sequential"] / medians["batched"]
        per_image = {k: v / ERF_IMAGES * 1e3 for k, v in medians.items()}
        print(
            f"  {name:20s} {size:3d}px  sequential {per_image['sequential']:7.1f} ms/image  "
            f"batched {per_image['batched']:7.1f} ms/image  speed-up {speedup:.2f}x "
            f"({'meets' if speedup >= 2 else 'misses'} the 2x target)  max relative difference {diff:.1e} "
            f"({'within' if diff <= 1e-5 else 'OUTSIDE'} 1e-5)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", choices=["attention", "erf"])
    args = parser.parse_args()
    if args.only in (None, "attention"):
        bench_attention(args.repeats)
    if args.only in (None, "erf"):
        bench_erf(args.repeats)


if __name__ == "__main__":
    main()

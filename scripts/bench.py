"""Benchmarks that print ratios against a plain forward pass, measured in one run.

    python scripts/bench.py [--repeats 7] [--only attention|erf]

attention: capture + all metrics + rollout (``vizlib.attention.analyse_attention``) against a plain
timm forward of the same model and input (random weights: the timing does not depend on them).
Target (issue #2): at most 1.3x for vit_base_patch16_224 at 224 on a 2-core CPU.
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
from vizlib.attention import analyse_attention  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", choices=["attention", "erf"])
    args = parser.parse_args()
    if args.only in (None, "attention"):
        bench_attention(args.repeats)


if __name__ == "__main__":
    main()

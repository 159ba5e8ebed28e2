"""Compare the attention metrics of several ViTs over a set of images (the distillation study).

    python scripts/compare_attention.py --models vit_cifar deit_cifar_distilled [--images PATH ...]

Prints, per model and layer, the head-mean of every metric averaged over the images (default: the
bundled CIFAR-10 samples, the models' training domain), then the last layer side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vizlib.attention import analyse_attention  # noqa: E402
from vizlib.images import list_samples, load_image, preprocess  # noqa: E402
from vizlib.weights import load_model  # noqa: E402


def mean_curves(model_name: str, weights: str, images: list[Path]) -> dict[str, list[float]]:
    loaded = load_model(model_name, weights)
    totals: dict[str, torch.Tensor] = {}
    for path in images:
        x = preprocess(load_image(path), loaded.pretrained_cfg)[0]
        for metric, values in analyse_attention(loaded.model, x).layer_means().items():
            totals[metric] = totals.get(metric, torch.zeros(len(values))) + torch.tensor(values)
    return {metric: (total / len(images)).tolist() for metric, total in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_cifar", "deit_cifar_distilled"])
    parser.add_argument("--weights", default="bundled")
    parser.add_argument("--images", nargs="*", type=Path)
    args = parser.parse_args()
    images = args.images or [p for p in list_samples() if p.name.startswith("cifar_")]
    curves = {name: mean_curves(name, args.weights, images) for name in args.models}
    metrics = list(next(iter(curves.values())))
    print(f"{len(images)} images; head-mean per layer, averaged over images")
    for name, by_metric in curves.items():
        print(f"\n{name}")
        print("layer " + " ".join(f"{m[:12]:>12s}" for m in metrics))
        for layer in range(len(by_metric[metrics[0]])):
            print(f"{layer + 1:5d} " + " ".join(f"{by_metric[m][layer]:12.4f}" for m in metrics))
    print("\nlast layer: " + ", ".join(
        f"{m} " + " vs ".join(f"{curves[n][m][-1]:.3f}" for n in args.models) for m in metrics))


if __name__ == "__main__":
    main()

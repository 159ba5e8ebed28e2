"""``python -m vizlib erf``: the effective receptive field of one model over N images, as JSON.

    python -m vizlib erf --model cetnet_cifar --ce-depth 3 --images assets/samples --n 8 --json erf.json

Prints (or writes) ``{"model", "weights", "ce_depth", "images", "n_images", "n_skipped", "size",
"area_ratio": {"0.2", "0.3", "0.5", "0.99"}, "map": [[...]]}``: ``map`` is the mean ERF before log scaling,
``n_images`` how many images it averages (images whose map held NaN are skipped and counted in
``n_skipped``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vizlib.cli import CliError

HELP = "effective receptive field (RepLKNet recipe) and its area ratios over N images"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registered model or checkpoint id, e.g. cetnet_cifar")
    parser.add_argument("--weights", default="bundled",
                        help="bundled | hub | PATH to a checkpoint | init (random initialisation, seeded)")
    parser.add_argument("--ce-depth", type=int, help="CETNet CE depth; with bundled weights picks cetnet_cifar_ce{D}")
    parser.add_argument("--images", nargs="+", required=True,
                        help="image files or folders (folders: every image inside, sorted, recursively)")
    parser.add_argument("--n", type=int, help="use the first N images (default: all)")
    parser.add_argument("--size", type=int, help="input side in pixels (default: the model's own, 32 for CIFAR)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per backward pass (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (--weights init)")
    parser.add_argument("--json", help="write the JSON here instead of printing it")


def image_paths(items: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images in sorted order."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(path)
    return paths


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vizlib import erf
    from vizlib.images import ImageError, load_image
    from vizlib.weights import WeightsError

    paths = image_paths(args.images)
    n = len(paths) if args.n is None else args.n
    if n < 1:
        raise CliError("--n must be at least 1")
    if n > len(paths):
        raise CliError(f"--n {n} asks for more images than the {len(paths)} given")
    if args.size is not None and args.size < 8:
        raise CliError("--size must be at least 8 pixels")
    if args.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    paths = paths[:n]
    kwargs = {} if args.ce_depth is None else {"ce_depth": args.ce_depth}
    try:
        loaded = erf.load_erf_model(args.model, args.weights, size=args.size, seed=args.seed, **kwargs)
    except (WeightsError, FileNotFoundError) as error:
        raise CliError(str(error)) from error
    except RuntimeError as error:  # e.g. an unknown model name from timm
        raise CliError(f"could not create model '{args.model}': {error}") from error
    size = args.size or erf.native_size(loaded.pretrained_cfg)
    pictures = []
    for path in paths:
        try:
            pictures.append(load_image(path))
        except (ImageError, OSError) as error:
            raise CliError(f"{path}: {error}") from error
    images = erf.prepare_images(pictures, loaded.pretrained_cfg, size)
    try:
        result = erf.erf_accumulate(loaded.model, images, batch_size=args.batch_size)
    except (TypeError, ValueError, RuntimeError) as error:  # a model that cannot take this size or map
        raise CliError(f"{args.model} at {size}x{size}: {error}") from error
    return {
        "model": args.model,
        "weights": loaded.weights,
        "ce_depth": args.ce_depth,
        "images": [str(p) for p in paths],
        "n_images": result.n_used,
        "n_skipped": result.n_skipped,
        "size": size,
        "area_ratio": {str(t): r for t, r in erf.area_ratios(result.map).items()},
        "map": result.map.tolist(),
    }

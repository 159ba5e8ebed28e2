"""Command-line interface: the numbers each page shows, as JSON, for notebooks and scripts.

Bad input ends with a one-line message on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _emit(payload: dict[str, Any], json_path: str | None) -> None:
    text = json.dumps(payload, indent=None if json_path else 2)
    if json_path:
        Path(json_path).write_text(text + "\n")
        print(f"wrote {json_path}")
    else:
        print(text)


def _load(model_name: str, weights: str, **model_kwargs: Any) -> Any:
    from vizlib.weights import WeightsError, load_model

    try:
        return load_model(model_name, weights, **model_kwargs)
    except (WeightsError, FileNotFoundError) as error:
        raise CliError(str(error)) from error
    except RuntimeError as error:  # e.g. an unknown model name from timm
        raise CliError(f"could not create model '{model_name}': {error}") from error


def _image_tensor(path: str, pretrained_cfg: dict) -> Any:
    from vizlib.images import ImageError, load_image, preprocess

    try:
        image = load_image(Path(path))
    except (ImageError, OSError) as error:
        raise CliError(f"{path}: {error}") from error
    return preprocess(image, pretrained_cfg)[0]


def cmd_attention(args: argparse.Namespace) -> dict[str, Any]:
    from vizlib.attention import analyse_attention

    loaded = _load(args.model, args.weights)
    x = _image_tensor(args.image, loaded.pretrained_cfg)
    try:
        analysis = analyse_attention(loaded.model, x)
    except (TypeError, ValueError) as error:
        raise CliError(str(error)) from error
    layers = []
    for name, values in zip(analysis.layer_names, analysis.layer_metrics, strict=True):
        heads = [
            {metric: float(values[metric][h]) for metric in
             ("query_independence", "entropy", "topk_mass", "gini", "mean_attention_distance")}
            for h in range(analysis.num_heads)
        ]
        layers.append({"name": name, "heads": heads, "head_independence": float(values["head_independence"])})
    return {
        "model": args.model,
        "weights": loaded.weights,
        "image": args.image,
        "num_prefix_tokens": analysis.num_prefix_tokens,
        "grid": list(analysis.grid),
        "layers": layers,
        "rollout": analysis.rollout.tolist(),
    }


def cmd_models(args: argparse.Namespace) -> dict[str, Any]:
    import timm

    import models  # noqa: F401  (registers the zoo)
    from vizlib.checkpoints import list_checkpoints
    from vizlib.weights import HUB_MODELS, available_sources

    zoo = sorted(name for name in timm.list_models() if _is_zoo_model(name))
    entries = [{"name": name, "sources": available_sources(name)} for name in zoo]
    entries += [{"name": name, "sources": available_sources(name)} for name in HUB_MODELS]
    bundled = [
        {"checkpoint_id": info.checkpoint_id, "model": info.model, "model_kwargs": info.model_kwargs,
         "test_accuracy": info.test_accuracy}
        for info in list_checkpoints()
    ]
    return {"models": entries, "bundled": bundled}


def _is_zoo_model(name: str) -> bool:
    """True for models registered by this project's ``models`` package (not timm's own)."""
    import timm

    return timm.models.model_entrypoint(name).__module__.startswith("models.")


COMMANDS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "attention": cmd_attention,
    "models": cmd_models,
}


def build_parser() -> argparse.ArgumentParser:
    from vizlib.commands import COMMANDS as PAGE_COMMANDS  # noqa: N811
    parser = argparse.ArgumentParser(prog="python -m vizlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    attention = sub.add_parser("attention", help="ViT attention metrics and rollout for one image")
    attention.add_argument("--model", required=True, help="registered model name, e.g. vit_cifar")
    attention.add_argument("--weights", default="bundled", help="bundled | hub | PATH to a checkpoint")
    attention.add_argument("--image", required=True, help="jpg/png/webp/bmp/gif file")
    attention.add_argument("--json", help="write the JSON here instead of printing it")

    listing = sub.add_parser("models", help="registered models and their weight sources")
    listing.add_argument("--json", action="store_true", help="print JSON (the only format)")

    for name, module_name in PAGE_COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP)
        module.configure(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from vizlib.commands import COMMANDS as PAGE_COMMANDS  # noqa: N811

    args = build_parser().parse_args(argv)
    try:
        if args.command in PAGE_COMMANDS:
            payload = importlib.import_module(PAGE_COMMANDS[args.command]).run(args)
        else:
            payload = COMMANDS[args.command](args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    json_path = args.json if isinstance(getattr(args, "json", None), str) else None
    _emit(payload, json_path)
    return 0

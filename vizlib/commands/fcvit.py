"""``python -m vizlib fcvit``: FCViT global-context maps and their comparison with ViT attention."""

from __future__ import annotations

import argparse
from typing import Any

from vizlib.cli import CliError, _image_tensor, _load

HELP = "FCViT GlobalContext similarity maps per block and head, next to ViT attention"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="fcvit_cifar", help="FCViT model or checkpoint id (fcvit_cifar)")
    parser.add_argument("--weights", default="bundled", help="bundled | hub | PATH to a checkpoint")
    parser.add_argument("--image", required=True, help="jpg/png/webp/bmp/gif file")
    parser.add_argument("--vit", default="vit_cifar", help="ViT to compare with (vit_cifar); 'none' to skip")
    parser.add_argument("--vit-weights", default="bundled", help="weights of the ViT: bundled | hub | PATH")
    parser.add_argument("--maps", action="store_true", help="also write the S'' and context maps")
    parser.add_argument("--json", help="write the JSON here instead of printing it")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vizlib.attention import analyse_attention
    from vizlib.fcvit_view import analyse_fcvit, compare_with_vit

    loaded = _load(args.model, args.weights)
    try:
        analysis = analyse_fcvit(loaded.model, _image_tensor(args.image, loaded.pretrained_cfg))
    except (TypeError, ValueError) as error:
        raise CliError(str(error)) from error
    payload: dict[str, Any] = {"model": args.model, "weights": loaded.weights, "image": args.image,
                               **analysis.summary()}
    if args.maps:
        for entry, maps in zip(payload["modules"], analysis.modules, strict=True):
            entry["similarity_rescaled"] = maps.similarity_rescaled.tolist()
            entry["context"] = maps.context.tolist()
    if args.vit.lower() != "none":
        vit = _load(args.vit, args.vit_weights)
        try:
            attention = analyse_attention(vit.model, _image_tensor(args.image, vit.pretrained_cfg))
        except (TypeError, ValueError) as error:
            raise CliError(f"{args.vit}: {error}") from error
        payload["comparison"] = {"vit_model": args.vit, "vit_weights": vit.weights,
                                 **compare_with_vit(analysis, attention)}
    return payload

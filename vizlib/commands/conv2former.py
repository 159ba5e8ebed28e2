"""``python -m vizlib conv2former``: Conv2Former modulation maps, kernel footprints, ViT for comparison."""

from __future__ import annotations

import argparse
from typing import Any

from vizlib.cli import CliError, _image_tensor, _load

HELP = "Conv2Former A, V and A*V per block, receptive fields for k=7/11, next to ViT attention"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="conv2former_cifar", help="Conv2Former model or checkpoint id")
    parser.add_argument("--weights", default="bundled", help="bundled | hub | PATH to a checkpoint")
    parser.add_argument("--image", required=True, help="jpg/png/webp/bmp/gif file")
    parser.add_argument("--groups", type=int, default=8, help="channel groups per map (default 8)")
    parser.add_argument("--vit", default="vit_cifar", help="ViT to compare with (vit_cifar); 'none' to skip")
    parser.add_argument("--vit-weights", default="bundled", help="weights of the ViT: bundled | hub | PATH")
    parser.add_argument("--json", help="write the JSON here instead of printing it")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vizlib.attention import analyse_attention
    from vizlib.conv2former_view import analyse_conv2former, vit_footprint

    if args.groups < 1:
        raise CliError(f"--groups must be at least 1, got {args.groups}")
    loaded = _load(args.model, args.weights)
    try:
        analysis = analyse_conv2former(loaded.model, _image_tensor(args.image, loaded.pretrained_cfg),
                                       groups=args.groups)
    except (TypeError, ValueError) as error:
        raise CliError(str(error)) from error
    payload: dict[str, Any] = {"model": args.model, "weights": loaded.weights, "image": args.image,
                               **analysis.summary()}
    if args.vit.lower() != "none":
        vit = _load(args.vit, args.vit_weights)
        try:
            attention = analyse_attention(vit.model, _image_tensor(args.image, vit.pretrained_cfg))
        except (TypeError, ValueError) as error:
            raise CliError(f"{args.vit}: {error}") from error
        footprint = vit_footprint(attention, analysis.input_size)
        payload["vit"] = {"model": args.vit, "weights": vit.weights,
                          "query_independence": float(attention.layer_metrics[-1]["query_independence"].mean()),
                          **footprint.summary()}
    return payload

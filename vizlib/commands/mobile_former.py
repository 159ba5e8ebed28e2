"""``python -m vizlib mobile-former``: Mobile-Former's two bridges per block, as the page shows them."""

from __future__ import annotations

import argparse
from typing import Any

from vizlib.cli import CliError, _image_tensor, _load

HELP = "Mobile-Former bridges per block: token regions, pixel-to-token assignment, token similarity"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mobile_former_cifar",
                        help="Mobile-Former model or checkpoint id (mobile_former_cifar)")
    parser.add_argument("--weights", default="bundled", help="bundled | hub | PATH to a checkpoint")
    parser.add_argument("--image", required=True, help="jpg/png/webp/bmp/gif file")
    parser.add_argument("--head", type=int, default=None,
                        help="bridge head (0 or 1) for the per-token numbers; default: mean of heads")
    parser.add_argument("--json", help="write the JSON here instead of printing it")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vizlib.mobile_former_view import analyse_mobile_former

    loaded = _load(args.model, args.weights)
    try:
        analysis = analyse_mobile_former(loaded.model, _image_tensor(args.image, loaded.pretrained_cfg))
    except (TypeError, ValueError) as error:
        raise CliError(str(error)) from error
    if args.head is not None and not 0 <= args.head < analysis.num_heads:
        raise CliError(f"--head must be between 0 and {analysis.num_heads - 1}, got {args.head}")
    probs = analysis.logits.softmax(-1)
    top = int(probs.argmax())
    return {
        "model": args.model,
        "weights": loaded.weights,
        "image": args.image,
        "num_tokens": analysis.num_tokens,
        "num_heads": analysis.num_heads,
        "head": "mean" if args.head is None else args.head,
        "prediction": {"class": loaded.class_names[top], "probability": float(probs[top])},
        "blocks": analysis.summary(args.head),
    }

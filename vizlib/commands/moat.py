"""``python -m vizlib moat``: the same MOAT weights in global and window attention, as the page shows them."""

from __future__ import annotations

import argparse
from typing import Any

from vizlib.cli import CliError, _image_tensor, _load

HELP = "MOAT global vs window attention: feature differences and the query's outside-window gradient share"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="moat_cifar", help="MOAT model or checkpoint id (moat_cifar)")
    parser.add_argument("--weights", default="bundled", help="bundled | hub | PATH to a checkpoint")
    parser.add_argument("--image", required=True, help="jpg/png/webp/bmp/gif file")
    parser.add_argument("--window", type=int, default=None, metavar="W",
                        help="W x W windows in every MOAT stage (default: each stage's default window)")
    parser.add_argument("--query", type=int, nargs=2, default=None, metavar=("ROW", "COL"),
                        help="query cell on the first MOAT block's grid (default: its centre)")
    parser.add_argument("--json", help="write the JSON here instead of printing it")


def _prediction(logits: Any, class_names: list[str]) -> dict[str, Any]:
    probs = logits.softmax(-1)
    top = int(probs.argmax())
    return {"class": class_names[top], "probability": float(probs[top])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vizlib.moat_view import analyse_moat, receptive_field, window_label

    if args.window is not None and args.window < 1:
        raise CliError(f"--window must be a positive number of tokens, got {args.window}")
    loaded = _load(args.model, args.weights)
    x = _image_tensor(args.image, loaded.pretrained_cfg)
    query = tuple(args.query) if args.query is not None else None
    try:
        analysis = analyse_moat(loaded.model, x, args.window)
        field = receptive_field(loaded.model, x, args.window, query)  # None: the centre cell
    except (TypeError, ValueError) as error:
        raise CliError(str(error)) from error
    blocks = []
    for view, rf in zip(analysis.blocks, field.blocks, strict=True):
        blocks.append({
            "name": view.name,
            "grid": list(view.grid),
            "window": list(view.window),
            "window_is_global": view.window_is_global,
            "feature_difference": view.feature_difference,
            "cross_window_attention": view.cross_window_mass(),
            "query": list(rf.query),
            "query_window": {"rows": [rf.bounds[0], rf.bounds[1]], "cols": [rf.bounds[2], rf.bounds[3]]},
            "outside_window_share": {mode: dict(rf.modes[mode].outside) for mode in ("window", "global")},
        })
    return {
        "model": args.model,
        "weights": loaded.weights,
        "image": args.image,
        "window": window_label(args.window),
        "reference_grid": list(analysis.reference_grid),
        "query": list(field.query),
        "prediction": {"global": _prediction(analysis.logits_global, loaded.class_names),
                       "window": _prediction(analysis.logits_window, loaded.class_names)},
        "stage_difference": analysis.stage_difference,
        "final_difference": analysis.final_difference,
        "blocks": blocks,
    }

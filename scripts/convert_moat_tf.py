"""Convert an official deeplab2 MOAT TensorFlow checkpoint to a HybridLens safetensors file.

The checkpoints (``https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/<name>.tar.gz``)
are TF name-based checkpoints. Unpack the archive, then e.g.::

    python scripts/convert_moat_tf.py moat0_imagenet_1k_224_w_position_embedding/ \\
        --model moat_0 --out moat_0.safetensors [--prefer-ema]

Reading the checkpoint needs TensorFlow (``pip install tensorflow-cpu``); it is optional for the
app and only this script imports it. Whether the position embedding is present and the number of
classes are read from the checkpoint; the result is loaded into the timm model with
``strict=True`` before it is written, so a written file always matches the architecture. Load it
with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))`` (plus
``use_position_embedding=False`` for the ``_wo_position_embedding`` checkpoints).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read_tf_checkpoint(path: str) -> dict[str, np.ndarray]:
    """All variables of a TF checkpoint (directory or prefix) as numpy arrays."""
    try:
        import tensorflow as tf  # optional: only this script needs it
    except ImportError:
        sys.exit(
            "convert_moat_tf.py needs TensorFlow to read the official checkpoint: "
            "pip install tensorflow-cpu (only for this conversion; the app does not need it)."
        )
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="unpacked checkpoint directory (or checkpoint prefix)")
    parser.add_argument("--model", required=True, help="timm name, e.g. moat_0, tiny_moat_2")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument(
        "--prefer-ema", action="store_true", help="use the /ExponentialMovingAverage copies where present"
    )
    parser.add_argument("--half", action="store_true", help="store floating tensors as float16")
    args = parser.parse_args(argv)

    import timm
    from safetensors.torch import save_file

    import models.moat as moat

    variables = read_tf_checkpoint(args.checkpoint)
    state = moat.convert_tf_variables(variables, prefer_ema=args.prefer_ema)
    has_pe = any(key.endswith("relative_position_embedding") for key in state)
    num_classes = state["logits_head.weight"].shape[0] if "logits_head.weight" in state else 0
    model = timm.create_model(args.model, use_position_embedding=has_pe, num_classes=num_classes)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        print(f"checkpoint does not match {args.model}:", file=sys.stderr)
        print(f"  missing: {missing[:20]}", file=sys.stderr)
        print(f"  unexpected: {unexpected[:20]}", file=sys.stderr)
        return 1
    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    if args.half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(
        tensors,
        args.out,
        metadata={
            "model": args.model,
            "use_position_embedding": str(has_pe),
            "source": str(args.checkpoint),
            "ema": str(args.prefer_ema),
        },
    )
    skipped = len(variables) - sum(1 for k in state if not k.endswith("num_batches_tracked"))
    print(
        f"wrote {args.out}: {len(tensors)} tensors, {num_classes} classes, position embedding {has_pe}, "
        f"{'EMA' if args.prefer_ema else 'raw'} weights ({skipped} TF variables not used: EMA copies, "
        f"optimizer slots, step counters)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

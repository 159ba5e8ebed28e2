"""Re-estimate a checkpoint's BatchNorm statistics on training images and save it as a new stage.

For a checkpoint whose short training left BatchNorm running statistics behind its weights (eval
mode far below train mode). No weight changes; the card records the step, the test accuracy after
it and the command.

Example:
    python scripts/recalibrate_bn.py --checkpoint moat_cifar --data CIFAR-10-images --images 10000 --out /tmp/ckpt
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import torch  # noqa: E402

from vizlib.checkpoints import CHECKPOINT_DIR, save_checkpoint  # noqa: E402
from vizlib.training import (  # noqa: E402
    CheckpointError,
    DataError,
    evaluate,
    fp16_round_trip,
    json_line,
    load_checkpoint_model,
    load_imagefolder,
    model_mean_std,
    recalibrate_batchnorm,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help=f"id in {CHECKPOINT_DIR} or a .safetensors path")
    p.add_argument("--data", required=True, help="ImageFolder root holding train/ and test/")
    p.add_argument("--images", type=int, default=10_000, help="training images to average over (first N of a seeded shuffle)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", required=True, help="output folder of the recalibrated checkpoint")
    p.add_argument("--checkpoint-id", help="file stem of the result (default: the input's id)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python scripts/recalibrate_bn.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, command)
    except (FileNotFoundError, CheckpointError, DataError) as error:
        print(f"recalibrate_bn.py: error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        torch.set_num_threads(threads_before)  # main() may run in-process (tests)


def run(args: argparse.Namespace, command: str) -> int:
    t0 = time.time()
    model, info = load_checkpoint_model(args.checkpoint)
    train = load_imagefolder(Path(args.data) / "train")
    test = load_imagefolder(Path(args.data) / "test")
    if info.class_names and info.class_names != train.class_names:  # labels would not line up
        raise CheckpointError(f"{info.checkpoint_id} was trained on other classes than those of {args.data}.")
    mean, std = model_mean_std(model)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.images]
    subset = dataclasses.replace(train, images=train.images[order], labels=train.labels[order])
    layers = recalibrate_batchnorm(model, subset, mean, std, args.batch_size)
    if layers == 0:
        raise CheckpointError(f"{info.checkpoint_id} ({info.model}) has no BatchNorm layer to recalibrate.")
    state = fp16_round_trip(model.state_dict())
    model.load_state_dict(state)  # test the weights exactly as stored
    hits, total = evaluate(model, test, mean, std)
    accuracy = 100.0 * hits / total
    # The card's figure (evaluate.py reproduces it), not a second pass over the test set.
    accuracy_before = info.test_accuracy if info.test_accuracy is not None else float("nan")
    step = {
        "layers": layers, "train_images": len(subset), "seed": args.seed,
        "test_accuracy_before": round(accuracy_before, 4),
    }
    result = dataclasses.replace(
        info, checkpoint_id=args.checkpoint_id or info.checkpoint_id, test_accuracy=round(accuracy, 4),
        recipe={**info.recipe, "bn_recalibration": step},
        wall_time_s=round((info.wall_time_s or 0.0) + time.time() - t0, 1),
        command=f"{info.command}\n{command}",
        notes=(
            f"{info.notes} BatchNorm statistics then re-estimated as the plain average over {len(subset):,} "
            f"training images (no weight changed): test accuracy {accuracy_before:.2f}% -> {accuracy:.2f}%."
        ).strip(),
    )
    weights = save_checkpoint(state, result, Path(args.out))
    print(f"{layers} BatchNorm layers: test accuracy {accuracy_before:.2f}% -> {accuracy:.2f}%, saved {weights}")
    print(json_line({"checkpoint_id": result.checkpoint_id, "test_accuracy": result.test_accuracy,
                     "before": step["test_accuracy_before"], "weights": str(weights)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure a checkpoint's accuracy on an ImageFolder split (the test split of CIFAR-10).

Preprocessing is the one train.py used for testing: images at their own size (no resize for 32x32
CIFAR), scaled to [0, 1], normalised with the mean/std of the model's ``pretrained_cfg``, float32.

Example:
    python scripts/evaluate.py --checkpoint vit_tiny_cifar --data CIFAR-10-images/test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import torch  # noqa: E402

from vizlib.checkpoints import CHECKPOINT_DIR  # noqa: E402
from vizlib.training import (  # noqa: E402
    CheckpointError,
    DataError,
    evaluate,
    json_line,
    list_imagefolder,
    load_checkpoint_model,
    load_imagefolder,
    model_mean_std,
    pick_device,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help=f"id in {CHECKPOINT_DIR} or a .safetensors path")
    p.add_argument("--data", required=True, help="ImageFolder split folder, e.g. CIFAR-10-images/test")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-cache", action="store_true", help="do not read/write the decoded .npz cache")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def fail(message: str) -> int:
    print(f"evaluate.py: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads_before)  # main() may run in-process (tests)


def run(args: argparse.Namespace) -> int:
    try:
        device = pick_device(args.device)
    except ValueError as error:
        return fail(str(error))
    data_dir = Path(args.data)
    try:
        model, info = load_checkpoint_model(args.checkpoint)
    except (FileNotFoundError, CheckpointError) as error:
        return fail(str(error))
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        return fail(f"{data_dir} holds train/ and test/: point --data at the split, e.g. {data_dir / 'test'}.")
    try:
        _, _, folder_classes = list_imagefolder(data_dir)
    except DataError as error:
        return fail(str(error))
    if info.class_names and folder_classes != info.class_names:
        return fail(
            f"the class folders of {data_dir} ({', '.join(folder_classes)}) differ from the checkpoint's "
            f"classes ({', '.join(info.class_names)}), so labels would not line up."
        )
    try:
        data = load_imagefolder(data_dir, cache=not args.no_cache)
    except DataError as error:
        return fail(str(error))
    mean, std = model_mean_std(model)
    model = model.to(device, memory_format=torch.channels_last)
    t0 = time.time()
    correct, total = evaluate(model, data.to(device), mean, std, args.batch_size, device)
    accuracy = 100.0 * correct / total
    print(f"{info.checkpoint_id}: accuracy {accuracy:.2f}% ({correct}/{total}) on {args.data}", flush=True)
    print(json_line({
        "checkpoint_id": info.checkpoint_id, "model": info.model, "accuracy": round(accuracy, 4),
        "correct": correct, "total": total, "data": args.data, "device": str(device),
        "saved_accuracy": info.test_accuracy, "seconds": round(time.time() - t0, 2),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

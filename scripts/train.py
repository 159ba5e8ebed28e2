"""Train one registered model on an ImageFolder (CIFAR-10) and save it as a bundled checkpoint.

Built to run many copies in parallel on one GPU: the data set is a uint8 tensor on the device,
augmentation runs there on whole batches, and the Python loop never waits on the GPU inside an epoch.
The same code runs on CPU (float32) when there is no CUDA device.

Example:
    python scripts/train.py --model vit_tiny_patch16_224 \
        --model-kwargs '{"img_size": 32, "patch_size": 4}' --data CIFAR-10-images \
        --epochs 30 --batch-size 512 --lr 2e-3 --checkpoint-id vit_tiny_cifar
    python scripts/train.py --smoke --model resnet10t     # seconds, synthetic data, 2 steps
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import shlex
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

T_PROCESS = time.time()  # before the heavy imports below
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script from anywhere

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import models  # noqa: E402, F401 - registers the HybridLens families with timm
from vizlib.checkpoints import (  # noqa: E402
    CHECKPOINT_DIR,
    CIFAR10_CLASSES,
    CheckpointInfo,
    save_checkpoint,
)
from vizlib.training import (  # noqa: E402
    CheckpointError,
    DataError,
    ImageSet,
    TimeBudget,
    evaluate,
    fp16_round_trip,
    hardware_string,
    json_line,
    load_checkpoint_model,
    load_imagefolder,
    make_synthetic_imagefolder,
    model_mean_std,
    normalize,
    pick_device,
    random_crop_flip,
    random_erase,
    to_unit_float,
)

SMOKE_STEPS = 2
SMOKE_BATCH = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="registered timm model name")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict of constructor kwargs, e.g. '{\"ce_depth\": 3}'")
    p.add_argument("--data", help="ImageFolder root holding train/ and test/")
    p.add_argument("--train-dir", help="training split folder (overrides <data>/train)")
    p.add_argument("--test-dir", help="test split folder (overrides <data>/test)")
    p.add_argument("--data-desc", help="data description for the model card (default: derived)")
    p.add_argument("--no-cache", action="store_true", help="do not read/write the decoded .npz cache")
    p.add_argument("--workers", type=int, help="JPEG decoding processes (default: usable CPU cores)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (not scaled by batch size)")
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decay (not on norms, biases, tokens)")
    p.add_argument("--warmup-epochs", type=float, default=2.0, help="linear warm-up length (may be fractional)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=0.0, help="max global grad norm (0: off)")
    p.add_argument("--crop-pad", type=int, default=4, help="reflect padding of the random crop (0: no crop)")
    p.add_argument("--no-flip", action="store_true", help="disable the random horizontal flip")
    p.add_argument("--random-erasing", type=float, default=0.0, help="probability per image (0: off)")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(alpha, alpha) alpha (0: off)")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA of weights, e.g. 0.999 (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help=f"output folder (default {CHECKPOINT_DIR}, a temp dir with --smoke)")
    p.add_argument("--checkpoint-id", help="checkpoint file stem (default: the model name)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument(
        "--threads", type=int,
        help="torch CPU threads (default: torch's; 1 with --smoke, where more only add contention)",
    )
    p.add_argument(
        "--init",
        help="start from this checkpoint's weights (id in --out or assets/checkpoints, or .safetensors "
        "path) instead of random ones; its card becomes the first stage of the new card",
    )
    p.add_argument("--teacher", help="teacher checkpoint id (in --out or assets/checkpoints) or .safetensors path")
    p.add_argument("--distill", choices=("hard", "soft"), default="hard")
    p.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation term")
    p.add_argument("--distill-tau", type=float, default=1.0, help="temperature of soft distillation")
    p.add_argument("--eval-every", type=int, default=1, help="test-set evaluation every N epochs (last always)")
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument(
        "--time-limit-min", type=float,
        help="fit the LR schedule so the run (start-up, data, training, test, save) ends within M minutes",
    )
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--notes", default="", help="free text for the model card")
    p.add_argument("--smoke", action="store_true", help="2 steps (or --max-steps) on a synthetic ImageFolder (or --data), temp out")
    args = p.parse_args(argv)
    try:
        args.model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as error:
        p.error(f"--model-kwargs is not valid JSON ({error.msg})")
    if not isinstance(args.model_kwargs, dict):
        p.error("--model-kwargs must be a JSON object")
    if not args.smoke and not (args.data or (args.train_dir and args.test_dir)):
        p.error("give --data DIR (with train/ and test/) or both --train-dir and --test-dir")
    return args


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to ``peak`` then cosine decay to ``floor`` at step ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on norms, biases, tokens and position embeddings (1-D or named by the model)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class WeightEma:
    """Exponential moving average of the weights (buffers such as BN statistics are copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._pairs = list(zip(self.module.parameters(), model.parameters(), strict=True))
        self._buffers = list(zip(self.module.buffers(), model.buffers(), strict=True))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        # Short warm-up of the decay so early, random weights leave the average quickly.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema, live = zip(*self._pairs, strict=True)
        torch._foreach_lerp_(list(ema), list(live), 1.0 - decay)
        for ema_buffer, buffer in self._buffers:
            ema_buffer.copy_(buffer)


def describe_data(train: ImageSet, test: ImageSet, shown: str, smoke: bool) -> str:
    height, width = train.images.shape[-2:]
    if smoke and shown.startswith("synthetic"):
        name = "synthetic coloured shapes (smoke test)"
    elif train.class_names == CIFAR10_CLASSES and len(train) == 50000 and len(test) == 10000:
        name = "CIFAR-10 (Krizhevsky 2009), original train/test split re-encoded as JPEG ImageFolder"
    else:
        name = "ImageFolder"
    return (
        f"{name} at {shown}: train {len(train):,} / test {len(test):,} images, "
        f"{len(train.class_names)} classes, {width}x{height}, no resize"
    )


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, mode: str, tau: float
) -> torch.Tensor:
    if mode == "hard":  # DeiT hard distillation: the teacher's decision is the label
        return F.cross_entropy(student, teacher.argmax(dim=1))
    return F.kl_div(
        F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
        reduction="batchmean", log_target=True,
    ) * (tau * tau)


def main(argv: list[str] | None = None) -> int:
    # The time limit and the recorded wall time count from the interpreter's start when run as a
    # script (importing torch + timm takes seconds), from this call when called in-process.
    t_start = T_PROCESS if argv is None else time.time()
    args = parse_args(argv)
    shown_argv = sys.argv[1:] if argv is None else argv
    command = "python scripts/train.py " + shlex.join(shown_argv)
    random.seed(args.seed)
    np_rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    threads_before = torch.get_num_threads()
    threads = args.threads or (1 if args.smoke else None)
    if threads:
        # Tiny tensors on a shared CPU: OpenMP threads mostly wait on each other (measured 10x slower).
        torch.set_num_threads(threads)

    # Synthetic smoke data is removed at the end; a smoke run's default output folder is kept.
    temp = tempfile.TemporaryDirectory(prefix="hybridlens-smoke-") if args.smoke else None
    try:
        # -- data (decoded before CUDA starts, so the decoding pool may fork)
        synthetic = args.smoke and not (args.data or args.train_dir)
        if synthetic:
            assert temp is not None
            data_root = make_synthetic_imagefolder(Path(temp.name) / "data", seed=args.seed)
            train_dir, test_dir, shown = data_root / "train", data_root / "test", "synthetic (temp dir)"
        else:
            root = Path(args.data) if args.data else None
            train_dir = Path(args.train_dir) if args.train_dir else root / "train"  # type: ignore[operator]
            test_dir = Path(args.test_dir) if args.test_dir else root / "test"  # type: ignore[operator]
            shown = args.data if args.data else f"{args.train_dir} + {args.test_dir}"
        # A smoke run on real data writes the decoded cache too, so it can prepare a parallel fan-out.
        cache = not (args.no_cache or synthetic)
        t_data = time.time()
        try:
            train = load_imagefolder(train_dir, cache=cache, workers=args.workers)
            test = load_imagefolder(test_dir, cache=cache, workers=args.workers)
        except DataError as error:
            raise SystemExit(f"train.py: error: {error}") from None
        if train.class_names != test.class_names:
            raise SystemExit("train.py: error: the train and test folders have different class sub-folders.")
        data_s = time.time() - t_data
        if args.out:
            out_dir = Path(args.out)
        else:
            out_dir = Path(tempfile.mkdtemp(prefix="hybridlens-smoke-out-")) if args.smoke else CHECKPOINT_DIR
        checkpoint_id = args.checkpoint_id or (f"smoke-{args.model}" if args.smoke else args.model)
        return run(args, train, test, shown, out_dir, checkpoint_id, command, np_rng, t_start, data_s)
    finally:
        torch.set_num_threads(threads_before)  # main() may run in-process (tests)
        if temp is not None:
            temp.cleanup()


def run(
    args: argparse.Namespace, train: ImageSet, test: ImageSet, shown: str, out_dir: Path,
    checkpoint_id: str, command: str, np_rng: np.random.Generator, t_start: float, data_s: float,
) -> int:
    try:
        device = pick_device(args.device)
    except ValueError as error:
        raise SystemExit(f"train.py: error: {error}") from None
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    model_kwargs = dict(args.model_kwargs)
    model_kwargs.setdefault("num_classes", len(train.class_names))
    model = timm.create_model(args.model, **model_kwargs)
    init_info = load_init_weights(model, args, model_kwargs, out_dir, train.class_names) if args.init else None
    mean, std = model_mean_std(model)
    distilled = hasattr(model, "set_distilled_training")
    teacher = None
    if args.teacher:
        try:
            teacher, teacher_info = load_checkpoint_model(args.teacher, (out_dir, Path(CHECKPOINT_DIR)))
        except (FileNotFoundError, CheckpointError) as error:
            raise SystemExit(f"train.py: error: {error}") from None
        if teacher_info.class_names and teacher_info.class_names != train.class_names:
            raise SystemExit("train.py: error: the teacher was trained on other classes than this data's.")
        teacher_mean, teacher_std = model_mean_std(teacher)
        teacher = teacher.to(device, memory_format=torch.channels_last).requires_grad_(False)
        if distilled:
            model.set_distilled_training(True)  # DeiT: (cls, dist) logits while training
    model = model.to(device, memory_format=torch.channels_last)
    ema = WeightEma(model, args.ema_decay) if args.ema_decay > 0 else None
    train_model: nn.Module = torch.compile(model) if args.compile else model  # type: ignore[assignment]
    optimizer = torch.optim.AdamW(
        param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), fused=device.type == "cuda"
    )

    train_gpu, test_gpu = train.to(device), test.to(device)
    batch_size = min(args.batch_size, SMOKE_BATCH if args.smoke else args.batch_size, len(train))
    steps_per_epoch = max(1, len(train) // batch_size)  # drop the ragged last batch: static shapes
    max_steps = (args.max_steps or SMOKE_STEPS) if args.smoke else args.max_steps
    epochs_requested = math.ceil(max_steps / steps_per_epoch) if args.smoke else args.epochs
    requested_steps = epochs_requested * steps_per_epoch
    if max_steps:
        requested_steps = min(requested_steps, max_steps)
    total_steps = requested_steps
    warmup_requested = round(args.warmup_epochs * steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    budget = None
    if args.time_limit_min:
        budget = TimeBudget(
            args.time_limit_min * 60, t_start, requested_steps, steps_per_epoch, args.eval_every,
            len(test), batch_size,
        )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model} {model_kwargs} ({n_params / 1e6:.2f} M params) on {device} "
        f"({'bf16' if use_bf16 else 'fp32'}), train {len(train)} / test {len(test)} images "
        f"(loaded in {data_s:.1f} s), batch {batch_size}, {steps_per_epoch} steps/epoch"
        + (f", teacher {args.teacher} ({args.distill})" if teacher is not None else ""),
        flush=True,
    )

    step, epoch, stopped, lr = 0, 0, "", 0.0
    final_result: tuple[int, int] | None = None
    t_train = time.time()
    while step < total_steps and not stopped:
        t_epoch = time.time()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        order = torch.randperm(len(train), device=device, generator=generator)
        for batch_index in range(steps_per_epoch):
            if budget is not None:
                now = time.time()
                planned = budget.plan(step, total_steps, now)
                if _epochs(planned, steps_per_epoch) != _epochs(total_steps, steps_per_epoch):
                    print(f"time limit: schedule fitted to {planned} steps "
                          f"(~{_epochs(planned, steps_per_epoch)} epochs)", flush=True)
                total_steps = planned
                if step < total_steps and budget.out_of_time(now):  # safety net; plan() ends it first
                    stopped = f"time limit {args.time_limit_min} min"
                    break
            if step >= total_steps:
                break
            # Warm-up capped at a fifth of the schedule, which a time limit may have shortened.
            lr = lr_at(step, total_steps, min(warmup_requested, total_steps // 5), args.lr, args.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = order[batch_index * batch_size:(batch_index + 1) * batch_size]
            images, labels = train_gpu.images[index], train_gpu.labels[index]
            if args.crop_pad > 0 or not args.no_flip:
                images = random_crop_flip(images, args.crop_pad, generator, flip=not args.no_flip)
            x = to_unit_float(images)
            lam, labels_b = 1.0, None
            if args.mixup > 0:  # mix each image with the batch reversed (timm's cheap pairing)
                lam = float(np_rng.beta(args.mixup, args.mixup))
                x = x.mul(lam).add_(x.flip(0), alpha=1.0 - lam)
                labels_b = labels.flip(0)
            x = random_erase(x, args.random_erasing, generator)
            with autocast():
                out = train_model(normalize(x, mean, std))
                cls_logits, dist_logits = out if isinstance(out, tuple) else (out, out)
                loss = F.cross_entropy(cls_logits, labels, label_smoothing=args.label_smoothing)
                if labels_b is not None:
                    loss = lam * loss + (1.0 - lam) * F.cross_entropy(
                        cls_logits, labels_b, label_smoothing=args.label_smoothing
                    )
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(normalize(x, teacher_mean, teacher_std))
                    kd = distill_loss(dist_logits.float(), teacher_logits.float(), args.distill, args.distill_tau)
                    loss = (1.0 - args.distill_alpha) * loss + args.distill_alpha * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            if ema is not None:
                ema.update()
            # Accumulate on the device: a .item() per step would stall the GPU queue.
            loss_sum += loss.detach().float() * labels.shape[0]
            correct += (cls_logits.argmax(dim=1) == labels).sum()
            seen += labels.shape[0]
            step += 1
        if seen == 0:
            break
        epoch += 1
        mean_loss, train_acc = loss_sum.item() / seen, 100.0 * correct.item() / seen  # syncs the device
        train_s = time.time() - t_epoch
        eval_model = ema.module if ema is not None else model
        final = step >= total_steps or bool(stopped)
        test_text = ""
        if final or epoch % max(1, args.eval_every) == 0:
            if final:  # training is over: test the weights as they will be stored (fp16)
                eval_model.load_state_dict(fp16_round_trip(eval_model.state_dict()))
            t_eval = time.time()
            hits, total = evaluate(eval_model, test_gpu, mean, std, args.eval_batch_size, device)
            if budget is not None:
                budget.record_eval(time.time() - t_eval)
            final_result = (hits, total) if final else None
            test_text = f" test_acc {100.0 * hits / total:6.2f}%"
        print(
            f"epoch {epoch:3d}/{_epochs(total_steps, steps_per_epoch)} loss {mean_loss:.4f} "
            f"train_acc {train_acc:6.2f}%{test_text} lr {lr:.2e} "
            f"{time.time() - t_epoch:6.1f}s ({seen / train_s:,.0f} img/s train)",
            flush=True,
        )

    # -- final: the accuracy of the weights exactly as stored (fp16), so evaluate.py agrees
    final_model = ema.module if ema is not None else model
    state = fp16_round_trip(final_model.state_dict())
    if final_result is None:  # the loop stopped before testing the final weights
        final_model.load_state_dict(state)
        final_result = evaluate(final_model, test_gpu, mean, std, args.eval_batch_size, device)
    hits, total = final_result
    test_acc = 100.0 * hits / total
    wall_s = time.time() - t_start
    recipe = {
        "model_kwargs": model_kwargs, "epochs_requested": epochs_requested,
        "epochs_completed": round(step / steps_per_epoch, 2), "steps": step, "steps_requested": requested_steps,
        "steps_scheduled": total_steps, "steps_per_epoch": steps_per_epoch, "batch_size": batch_size,
        "optimizer": "AdamW(betas=(0.9, 0.999)), no decay on 1-D params/tokens", "lr": args.lr,
        "min_lr": args.min_lr, "schedule": "linear warm-up + cosine, per step",
        "warmup_epochs": args.warmup_epochs, "warmup_steps": min(warmup_requested, total_steps // 5),
        "weight_decay": args.weight_decay,
        "label_smoothing": args.label_smoothing, "clip_grad": args.clip_grad,
        "augmentation": _augment_text(args), "mixup_alpha": args.mixup, "random_erasing": args.random_erasing,
        "ema_decay": args.ema_decay, "precision": "bf16 autocast" if use_bf16 else "fp32",
        "channels_last": True, "compile": args.compile, "normalisation": {"mean": mean, "std": std},
        "seed": args.seed, "time_limit_min": args.time_limit_min, "stopped_early": stopped or None,
    }
    if teacher is not None:
        recipe.update(
            teacher=args.teacher, distill=args.distill, distill_alpha=args.distill_alpha,
            distill_tau=args.distill_tau if args.distill == "soft" else None,
            distill_heads="cls<-labels, dist<-teacher" if distilled else "one head, both targets",
        )
    if init_info is not None:
        recipe["init_from"] = earlier_stage(init_info, args.init)
    notes = " ".join(
        part for part in (
            args.notes,
            f"Data loading took {data_s:.1f} s of the wall time; training {time.time() - t_train:.0f} s.",
            f"The time limit fitted the schedule to {total_steps} of {requested_steps} steps."
            if total_steps != requested_steps else "",
            f"Stopped early: {stopped}." if stopped and not args.smoke else "",
        ) if part
    )
    info = CheckpointInfo(
        checkpoint_id=checkpoint_id, model=args.model, model_kwargs=model_kwargs,
        class_names=list(train.class_names), test_accuracy=round(test_acc, 4),
        data=args.data_desc or describe_data(train, test, shown, args.smoke), recipe=recipe, epochs=epoch,
        wall_time_s=round(wall_s, 1), hardware=hardware_string(device), seed=args.seed, command=command,
        notes=notes,
    )
    if init_info is not None:
        info = with_earlier_stage(info, init_info, round(step / steps_per_epoch, 2))
    weights = save_checkpoint(state, info, out_dir)
    print(f"test accuracy {test_acc:.2f}% ({hits}/{total}), saved {weights}", flush=True)
    print(json_line({
        "checkpoint_id": checkpoint_id, "model": args.model, "test_accuracy": info.test_accuracy,
        "epochs": epoch, "steps": step, "wall_time_s": info.wall_time_s, "weights": str(weights),
    }), flush=True)
    return 0


def load_init_weights(
    model: nn.Module, args: argparse.Namespace, model_kwargs: dict[str, Any], out_dir: Path,
    class_names: list[str],
) -> CheckpointInfo:
    """Load ``--init`` into ``model`` (strict), refusing a checkpoint of another model or config."""
    try:
        start, info = load_checkpoint_model(args.init, (out_dir, Path(CHECKPOINT_DIR)))
    except (FileNotFoundError, CheckpointError) as error:
        raise SystemExit(f"train.py: error: {error}") from None
    if info.model != args.model or info.model_kwargs != model_kwargs:
        raise SystemExit(
            f"train.py: error: --init {args.init} is {info.model} {info.model_kwargs}, "
            f"not {args.model} {model_kwargs}."
        )
    if info.class_names and info.class_names != list(class_names):
        raise SystemExit("train.py: error: the --init checkpoint was trained on other classes than this data's.")
    model.load_state_dict(start.state_dict(), strict=True)
    return info


def earlier_stage(info: CheckpointInfo, ref: str) -> dict[str, Any]:
    """What the card keeps of the checkpoint a run started from (its own earlier stages included)."""
    return {
        "checkpoint": ref, "test_accuracy": info.test_accuracy, "epochs": info.epochs,
        "wall_time_s": info.wall_time_s, "hardware": info.hardware, "command": info.command,
        "recipe": info.recipe,
    }


def with_earlier_stage(info: CheckpointInfo, earlier: CheckpointInfo, epochs_now: float) -> CheckpointInfo:
    """Card totals over both stages: epochs and wall time add up, hardware and commands are listed in order."""
    epochs = (earlier.epochs or 0) + info.epochs if info.epochs is not None else earlier.epochs
    wall = (earlier.wall_time_s or 0.0) + (info.wall_time_s or 0.0)
    same = earlier.hardware.endswith(info.hardware)  # a further stage on the same machine
    hardware = earlier.hardware if same else f"{earlier.hardware}; then {info.hardware}"
    notes = (
        f"Trained in stages: {earlier.epochs} epochs to {earlier.test_accuracy:.2f}% ({earlier.hardware}), "
        f"then {epochs_now:g} epochs from those weights ({info.hardware}). {info.notes}"
    )
    return dataclasses.replace(
        info, epochs=epochs, wall_time_s=round(wall, 1), hardware=hardware,
        command=f"{earlier.command}\n{info.command}", notes=notes,
    )


def _augment_text(args: argparse.Namespace) -> str:
    parts = []
    if args.crop_pad > 0:
        parts.append(f"random crop, {args.crop_pad}-px reflect padding")
    if not args.no_flip:
        parts.append("horizontal flip")
    if args.random_erasing > 0:
        parts.append(f"random erasing p={args.random_erasing}")
    if args.mixup > 0:
        parts.append(f"mixup alpha={args.mixup}")
    return ", ".join(parts) or "none"


def _epochs(steps: int, steps_per_epoch: int) -> int:
    return math.ceil(steps / steps_per_epoch)


if __name__ == "__main__":
    sys.exit(main())

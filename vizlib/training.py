"""Shared pieces of ``scripts/train.py`` and ``scripts/evaluate.py`` (no Streamlit).

The whole data set lives in memory as one uint8 tensor: CIFAR-10 is 60k 32x32 images (184 MB), so a
DataLoader with worker processes would only add per-batch Python overhead. Decoding the JPEGs once is
the slow part, so the decoded arrays are cached as an uncompressed ``.npz`` next to the split folder,
shared by every process that trains in parallel. Augmentation runs on the device, on whole batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from vizlib.checkpoints import (
    CHECKPOINT_DIR,
    CIFAR10_CLASSES,
    CheckpointInfo,
    load_tensors,
    read_info,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_VERSION = 1


class DataError(ValueError):
    """A data folder that cannot be used; the message is one sentence meant for the user."""


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be loaded; the message is one sentence for the user."""


@dataclass
class ImageSet:
    """A whole split in memory: ``images`` is (N, 3, H, W) uint8 with channels-last strides."""

    images: torch.Tensor
    labels: torch.Tensor  # (N,) int64
    class_names: list[str]
    root: Path

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.class_names, self.root)


# ----------------------------------------------------------------------------------------------
# ImageFolder loading


def list_imagefolder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of an ImageFolder: classes are the sorted sub-folders (as torchvision does)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"The data folder {root} does not exist or is not a folder.")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise DataError(f"The data folder {root} has no class sub-folders (expected <root>/<class>/<image>).")
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(class_names):
        files = sorted(
            p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        paths.extend(files)
        labels.extend([index] * len(files))
    if not paths:
        raise DataError(f"The data folder {root} has class sub-folders but no images in them.")
    return paths, labels, class_names


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_images(paths: Sequence[Path], workers: int | None = None) -> np.ndarray:
    """Decode images into one (N, H, W, 3) uint8 array; every image must have the same size."""
    workers = available_cpus() if workers is None else max(1, workers)
    arrays: list[np.ndarray]
    # fork is only safe before CUDA is initialised in this process; otherwise decode serially.
    can_fork = "fork" in _mp_start_methods() and not torch.cuda.is_initialized()
    if workers > 1 and len(paths) >= 2000 and can_fork:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            arrays = pool.map(_decode, paths, chunksize=max(64, len(paths) // (workers * 8)))
    else:
        arrays = [_decode(p) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        sizes = ", ".join(f"{s[1]}x{s[0]}" for s in sorted(shapes)[:4])
        raise DataError(f"The images must all have one size to be stacked, found several ({sizes}).")
    return np.stack(arrays)


def _mp_start_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()


def available_cpus() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _fingerprint(root: Path, paths: Sequence[Path], labels: Sequence[int], class_names: list[str]) -> str:
    # Names and sizes are enough to notice a changed folder; mtimes would change on every copy.
    digest = hashlib.sha1(f"v{CACHE_VERSION}|{'|'.join(class_names)}".encode())
    for path, label in zip(paths, labels, strict=True):
        digest.update(f"{path.relative_to(root)}|{path.stat().st_size}|{label}\n".encode())
    return digest.hexdigest()


def cache_path(root: Path) -> Path:
    """Where the decoded copy of one split folder is kept: beside it, keyed by the split's name."""
    root = Path(root).resolve()
    return root.parent / f".{root.name}.hybridlens-u8.npz"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so parallel training processes decode a split once, not once each."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, at worst several processes decode
        yield
        return
    try:
        handle = open(path, "a+")  # noqa: SIM115 - held for the lock's lifetime
    except OSError:  # read-only location: nothing to protect
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_imagefolder(root: Path | str, cache: bool = True, workers: int | None = None) -> ImageSet:
    """Load a whole ImageFolder split as uint8, using (and writing) the decoded ``.npz`` cache."""
    root = Path(root)
    paths, labels, class_names = list_imagefolder(root)
    if not cache:
        array = decode_images(paths, workers)
        return _to_imageset(array, np.asarray(labels), class_names, root)
    fingerprint = _fingerprint(root, paths, labels, class_names)
    target = cache_path(root)
    with _file_lock(target.with_name(target.name + ".lock")):
        array = _read_cache(target, fingerprint)
        if array is None:
            array = decode_images(paths, workers)
            _write_cache(target, array, np.asarray(labels), class_names, fingerprint)
    return _to_imageset(array, np.asarray(labels), class_names, root)


def _read_cache(path: Path, fingerprint: str) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            if str(archive["fingerprint"]) != fingerprint:
                return None
            return archive["images"]
    except (OSError, ValueError, KeyError):  # truncated or foreign file: decode again
        return None


def _write_cache(
    path: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], fingerprint: str
) -> None:
    try:
        # Write then rename, so a reader never sees half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp.npz", delete=False) as handle:
            np.savez(
                handle, images=images, labels=labels, class_names=np.asarray(class_names),
                fingerprint=np.asarray(fingerprint),
            )
        os.chmod(handle.name, 0o644)  # mkstemp makes it private; other users share the cache too
        os.replace(handle.name, path)
    except OSError:  # read-only data folder: the cache is only an optimisation
        return


def _to_imageset(array: np.ndarray, labels: np.ndarray, class_names: list[str], root: Path) -> ImageSet:
    # NHWC storage viewed as NCHW is exactly the channels_last layout the models want: no copy.
    images = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    return ImageSet(images, torch.from_numpy(labels.astype(np.int64)), class_names, root)


def make_synthetic_imagefolder(
    root: Path | str,
    num_classes: int = 10,
    per_class: int = 4,
    size: int = 32,
    seed: int = 0,
    splits: Sequence[str] = ("train", "test"),
) -> Path:
    """Write a tiny ImageFolder of coloured shapes (PNG, lossless) under ``root/<split>/<class>/``.

    The shape and hue follow the class, so a model can learn it; position, size and background are
    random. Class names are CIFAR-10's when there are ten classes, so checkpoints look like real ones.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = CIFAR10_CLASSES if num_classes == len(CIFAR10_CLASSES) else [f"class{i}" for i in range(num_classes)]
    for split in splits:
        for index, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            hue = np.array([(index * 97) % 256, (index * 53 + 80) % 256, (index * 29 + 160) % 256])
            for number in range(per_class):
                background = tuple(int(v) for v in rng.integers(0, 256, 3))
                image = Image.new("RGB", (size, size), background)
                draw = ImageDraw.Draw(image)
                extent = int(rng.integers(size // 3, size - 2))
                x0, y0 = (int(v) for v in rng.integers(0, size - extent + 1, 2))
                box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
                colour = tuple(int(v) for v in np.clip(hue + rng.integers(-20, 21, 3), 0, 255))
                if index % 3 == 0:
                    draw.ellipse(box, fill=colour)
                elif index % 3 == 1:
                    draw.rectangle(box, fill=colour)
                else:
                    draw.polygon([(x0, box[3]), (box[2], box[3]), ((x0 + box[2]) // 2, y0)], fill=colour)
                image.save(folder / f"{number:04d}.png")
    return root


# ----------------------------------------------------------------------------------------------
# Augmentation on the device, on whole batches


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map padded coordinates (may be negative or >= size) back inside, as reflect padding does."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def crop_flip(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, pad: int = 4
) -> torch.Tensor:
    """Crop each image at (top, left) of its ``pad``-px reflect-padded copy, then mirror where ``flip``.

    ``top``/``left`` lie in [0, 2*pad]. One gather with reflected indices does padding, crop and flip
    together, so nothing padded is ever allocated and uint8 works on every device.
    """
    n, _, height, width = images.shape
    if pad >= min(height, width):
        raise ValueError("reflect padding must be smaller than the image")
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    src_rows = _reflect(top[:, None] + rows[None, :] - pad, height)  # (N, H)
    col_offsets = torch.where(flip[:, None], (width - 1 - cols)[None, :], cols[None, :])
    src_cols = _reflect(left[:, None] + col_offsets - pad, width)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[batch, channels, src_rows[:, None, :, None], src_cols[:, None, None, :]]


def random_crop_flip(
    images: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None, flip: bool = True
) -> torch.Tensor:
    """Standard CIFAR augmentation: random crop with ``pad``-px reflect padding + horizontal flip."""
    n = images.shape[0]
    kwargs: dict[str, Any] = {"device": images.device, "generator": generator}
    top = torch.randint(0, 2 * pad + 1, (n,), **kwargs)
    left = torch.randint(0, 2 * pad + 1, (n,), **kwargs)
    flips = torch.randint(0, 2, (n,), **kwargs).bool() if flip else torch.zeros(n, dtype=torch.bool, device=images.device)
    return crop_flip(images, top, left, flips, pad)


def random_erase(
    x: torch.Tensor, prob: float, generator: torch.Generator | None = None,
    area: tuple[float, float] = (0.02, 1 / 3), log_ratio: tuple[float, float] = (math.log(0.3), math.log(10 / 3)),
) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) on a float batch in [0, 1]: one noise rectangle per chosen image."""
    if prob <= 0:
        return x
    n, _, height, width = x.shape
    opts: dict[str, Any] = {"device": x.device, "generator": generator}
    apply = torch.rand(n, **opts) < prob
    target = height * width * (area[0] + (area[1] - area[0]) * torch.rand(n, **opts))
    ratio = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(n, **opts))
    h = torch.sqrt(target * ratio).round().clamp(1, height)
    w = torch.sqrt(target / ratio).round().clamp(1, width)
    top = (torch.rand(n, **opts) * (height - h + 1)).floor()
    left = (torch.rand(n, **opts) * (width - w + 1)).floor()
    rows = torch.arange(height, device=x.device)[None, :, None]
    cols = torch.arange(width, device=x.device)[None, None, :]
    mask = (
        (rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
        & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]) & apply[:, None, None]
    )
    noise = torch.rand(x.shape, device=x.device, generator=generator, dtype=x.dtype)
    return torch.where(mask[:, None], noise, x)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel for a float batch in [0, 1], returned channels-last."""
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


def model_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation from the model's ``pretrained_cfg`` (ImageNet's when the model has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    return mean, std


# ----------------------------------------------------------------------------------------------
# Time limit


class TimeBudget:
    """Fits the length of the LR schedule (in steps) to a wall-clock limit.

    A run cut off by a timer mid-schedule ends at a high learning rate and loses much accuracy, so
    instead the schedule's total is re-planned from the step time measured over recent windows. The
    total may also grow back (up to the requested one) when the GPU speeds up, e.g. because parallel
    runs finished. Times come from ``time.time()`` without a device sync: over a window of many
    steps the queue the CPU runs ahead by is negligible.
    """

    def __init__(
        self, limit_s: float, t_start: float, requested_steps: int, steps_per_epoch: int,
        eval_every: int, eval_images: int, batch_size: int, skip_steps: int = 5,
        window: int | None = None,
    ) -> None:
        self.limit_s = limit_s
        self.t_start = t_start
        self.requested_steps = requested_steps
        self.steps_per_epoch = steps_per_epoch
        self.eval_every = max(1, eval_every)
        self.eval_images = eval_images
        self.batch_size = batch_size
        self.skip_steps = skip_steps  # first steps: cuDNN autotuning / compilation, not representative
        self.window = window or max(5, steps_per_epoch // 4)
        self.step_s: float | None = None
        self.eval_s: float | None = None
        self._mark: tuple[float, int] | None = None
        self._eval_in_window = 0.0

    def record_eval(self, seconds: float) -> None:
        self.eval_s = seconds
        self._eval_in_window += seconds

    def reserve_s(self) -> float:
        """Seconds kept for the final evaluation and saving."""
        if self.eval_s is not None:
            return 2 * self.eval_s + 10
        if self.step_s is not None:  # a forward pass costs about a third of a training step
            return 2 * math.ceil(self.eval_images / self.batch_size) * self.step_s / 3 + 10
        return 30.0

    def out_of_time(self, now: float) -> bool:
        return now - self.t_start > self.limit_s - self.reserve_s()

    def plan(self, step: int, total_steps: int, now: float) -> int:
        """The schedule's new total (at least ``step + 1``, at most the requested total)."""
        if self._mark is None:
            if step >= self.skip_steps:
                self._mark, self._eval_in_window = (now, step), 0.0
            return total_steps
        mark_time, mark_step = self._mark
        # A window ends after ``window`` steps, or sooner in time for slow models (few steps fit).
        long_enough = step - mark_step >= self.window or now - mark_time >= max(5.0, self.limit_s / 40)
        if step - mark_step < 2 or not long_enough:
            return total_steps
        self.step_s = max(1e-6, (now - mark_time - self._eval_in_window) / (step - mark_step))
        self._mark, self._eval_in_window = (now, step), 0.0
        # Periodic evaluations still to come, spread over the steps between them.
        eval_per_step = (self.eval_s or 0.0) / (self.steps_per_epoch * self.eval_every)
        left = self.limit_s - (now - self.t_start) - self.reserve_s()
        fit = step + int(max(0.0, left) / (self.step_s + eval_per_step))
        return max(step + 1, min(self.requested_steps, fit))


# ----------------------------------------------------------------------------------------------
# Evaluation and checkpoints


@torch.inference_mode()
def evaluate(
    model: nn.Module, data: ImageSet, mean: Sequence[float], std: Sequence[float],
    batch_size: int = 500, device: torch.device | str | None = None,
) -> tuple[int, int]:
    """(correct, total) of ``model`` in eval mode on ``data``, in float32.

    float32 (no autocast) so the number saved by train.py is what evaluate.py gets on any device.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(data), batch_size):
        x = normalize(to_unit_float(data.images[start:start + batch_size].to(device)), mean, std)
        y = data.labels[start:start + batch_size].to(device)
        correct += (model(x).argmax(dim=1) == y).sum()
    model.train(was_training)
    return int(correct.item()), len(data)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, data: ImageSet, mean: Sequence[float], std: Sequence[float], batch_size: int = 250,
) -> int:
    """Re-estimate every BatchNorm's running mean/var as the plain average over ``data``.

    A short run's running statistics (momentum 0.1 over few steps) lag the weights, so eval mode
    can score far below train mode; averaging fresh batch statistics of the final weights fixes
    that without touching a weight ("precise BN", Wu & Johnson 2021). Hand-written because neither
    timm nor torch ships it. Returns how many BatchNorm layers were recalibrated.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.eval()  # dropout and drop-path as at test time: only the norms see batch statistics
    for norm in norms:
        norm.train()
    try:
        device = next(model.parameters()).device
        for start in range(0, len(data), batch_size):
            model(normalize(to_unit_float(data.images[start:start + batch_size].to(device)), mean, std))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    return len(norms)


def fp16_round_trip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights exactly as a bundled checkpoint stores them (fp16), back in float32."""
    return {k: v.half().float() if v.is_floating_point() else v for k, v in state_dict.items()}


def resolve_checkpoint(ref: str | Path, search_dirs: Sequence[Path] = (CHECKPOINT_DIR,)) -> tuple[Path, Path]:
    """(weights, json) of a checkpoint given as a path (.safetensors or .json) or a bundled id."""
    candidate = Path(ref)
    if candidate.suffix in (".safetensors", ".json") and candidate.exists():
        weights, sidecar = candidate.with_suffix(".safetensors"), candidate.with_suffix(".json")
    else:
        for directory in search_dirs:
            weights, sidecar = Path(directory) / f"{ref}.safetensors", Path(directory) / f"{ref}.json"
            if weights.exists():
                break
        else:
            looked = ", ".join(str(d) for d in search_dirs)
            raise FileNotFoundError(f"No checkpoint '{ref}': it is neither a .safetensors file nor an id in {looked}.")
    if not weights.exists():
        raise FileNotFoundError(f"The checkpoint weights {weights} do not exist.")
    if not sidecar.exists():
        raise FileNotFoundError(f"The checkpoint {weights} has no JSON sidecar {sidecar.name} beside it.")
    return weights, sidecar


def load_checkpoint_model(
    ref: str | Path, search_dirs: Sequence[Path] = (CHECKPOINT_DIR,)
) -> tuple[nn.Module, CheckpointInfo]:
    """Build the registered model named in the sidecar and load its weights (strict), in eval mode."""
    import timm

    import models  # noqa: F401 - registers the HybridLens families with timm

    weights, sidecar = resolve_checkpoint(ref, search_dirs)
    try:
        info = read_info(sidecar)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"The sidecar {sidecar} is not valid checkpoint JSON ({error}).") from None
    try:
        model = timm.create_model(info.model, **info.model_kwargs)
    except (RuntimeError, TypeError) as error:  # unknown model name, or kwargs it does not take
        raise CheckpointError(f"Cannot build model '{info.model}' of {sidecar.name} ({error}).") from None
    try:
        model.load_state_dict(load_tensors(weights), strict=True)
    except (RuntimeError, OSError) as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"The weights {weights} do not fit model '{info.model}' ({first}).") from None
    return model.eval(), info


def pick_device(choice: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else CPU; asking for a missing GPU is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device.")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def hardware_string(device: torch.device) -> str:
    """GPU name (or CPU model) plus the CPU cores this process may use, for the model card."""
    cores = f"{available_cpus()} CPU cores"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cores}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{cpu_model()}, {cores}, torch {torch.__version__}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def json_line(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True)

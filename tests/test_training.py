"""Training/evaluation pipeline: loader, device augmentation, train.py smoke run, evaluate.py, distillation.

Everything runs on CPU on a tiny synthetic ImageFolder (the real CIFAR-10 is not needed). Only one
subprocess is started (train.py as a user runs it); the other runs call the scripts' ``main`` in-process
because importing torch + timm again costs several seconds on a shared 2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from vizlib.checkpoints import (
    CIFAR10_CLASSES,
    CheckpointInfo,
    load_tensors,
    read_info,
    save_checkpoint,
)
from vizlib.training import (
    TimeBudget,
    cache_path,
    crop_flip,
    load_imagefolder,
    make_synthetic_imagefolder,
    normalize,
    random_crop_flip,
    random_erase,
    recalibrate_batchnorm,
    to_unit_float,
)

ROOT = Path(__file__).resolve().parent.parent
TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
            '{"img_size": 32, "patch_size": 4, "depth": 2}']
TINY_DEIT = ["--model", "deit_tiny_distilled_patch16_224", "--model-kwargs",
             '{"img_size": 32, "patch_size": 4, "depth": 2}']
CHECKPOINT_FIELDS = {
    "checkpoint_id", "model", "model_kwargs", "class_names", "test_accuracy", "data", "recipe",
    "epochs", "wall_time_s", "hardware", "seed", "command",
}


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"hybridlens_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_imagefolder(tmp_path_factory.mktemp("synthetic"), per_class=4, seed=1)


@pytest.fixture(scope="module", autouse=True)
def smoke_process(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """train.py exactly as a user runs it (a subprocess, 3 steps), started first so that its
    interpreter start-up overlaps the in-process tests below."""
    out = tmp_path_factory.mktemp("out")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--smoke", "--max-steps", "3", *TINY_VIT,
         "--data", str(data_root), "--out", str(out), "--checkpoint-id", "tiny-vit", "--seed", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    yield process, out
    if process.poll() is None:  # a selection of tests that never waited for it
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def smoke_run(smoke_process: tuple[subprocess.Popen[str], Path]) -> tuple[Path, str]:
    process, out = smoke_process
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    return out, stdout


# -- loader ----------------------------------------------------------------------------------


def test_loader_labels_shape_pixels_and_cache(tmp_path: Path) -> None:
    root = make_synthetic_imagefolder(tmp_path / "d", per_class=3, seed=0, splits=("train",))
    data = load_imagefolder(root / "train")
    assert data.images.shape == (30, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.class_names == CIFAR10_CLASSES
    assert data.labels.tolist() == [c for c in range(10) for _ in range(3)]
    # Pixels equal an independent decode of the file of that index (classes sorted, files sorted).
    file = sorted((root / "train" / "cat").iterdir())[1]
    expected = np.asarray(Image.open(file).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(data.images[3 * 3 + 1].numpy(), expected)
    assert cache_path(root / "train").exists()
    again = load_imagefolder(root / "train")  # from the cache
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)
    file.unlink()  # a changed folder invalidates the cache
    assert len(load_imagefolder(root / "train")) == 29


# -- device augmentation ---------------------------------------------------------------------


def numpy_crop_flip(image: np.ndarray, top: int, left: int, flip: bool, pad: int) -> np.ndarray:
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    crop = padded[:, top:top + image.shape[1], left:left + image.shape[2]]
    return crop[:, :, ::-1] if flip else crop


def test_crop_flip_matches_numpy_reflect_pad() -> None:
    pad = 2
    image = np.random.default_rng(0).integers(0, 256, (3, 6, 7), dtype=np.uint8)
    cases = [(t, le, f) for t in range(2 * pad + 1) for le in range(2 * pad + 1) for f in (False, True)]
    batch = torch.from_numpy(np.stack([image] * len(cases)))
    top, left, flip = (torch.tensor(values) for values in zip(*cases, strict=True))
    out = crop_flip(batch, top, left, flip, pad)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    for i, (t, le, f) in enumerate(cases):
        assert np.array_equal(out[i].numpy(), numpy_crop_flip(image, t, le, f, pad)), (t, le, f)


def test_random_crop_flip_draws_valid_crops() -> None:
    pad = 4
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    images = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last, as loaded
    out = random_crop_flip(images, pad, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    flips = 0
    for i in range(len(images)):
        candidates = {
            (t, le, f): numpy_crop_flip(images[i].numpy(), t, le, f, pad)
            for t in range(2 * pad + 1) for le in range(2 * pad + 1) for f in (False, True)
        }
        matches = [key for key, crop in candidates.items() if np.array_equal(crop, out[i].numpy())]
        assert matches, f"image {i} is no reflect-padded crop of its source"
        flips += matches[0][2]
    assert 0 < flips < len(images)  # both branches drawn
    no_flip = random_crop_flip(images, 0, torch.Generator().manual_seed(0), flip=False)
    assert torch.equal(no_flip, images)


def test_random_erase_rectangles() -> None:
    x = torch.zeros(8, 3, 32, 32)
    assert torch.equal(random_erase(x, 0.0), x)
    out = random_erase(x, 1.0, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for image in out:
        touched = (image != 0).any(dim=0)
        rows, cols = touched.any(dim=1).nonzero(), touched.any(dim=0).nonzero()
        box = touched[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all(), "the erased area is one filled rectangle"
        assert 0.02 * 1024 * 0.5 <= box.numel() <= 1024 / 3 * 1.5


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_distillation_runs(
    mode: str, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import timm

    torch.manual_seed(0)
    teacher = timm.create_model("resnet10t", num_classes=10)
    info = CheckpointInfo("teacher", "resnet10t", {"num_classes": 10}, class_names=list(CIFAR10_CLASSES))
    save_checkpoint(teacher.state_dict(), info, tmp_path)
    train = load_script("train")
    argv = ["--smoke", *TINY_DEIT, "--data", str(data_root), "--out", str(tmp_path),
            "--checkpoint-id", "student", "--teacher", "teacher", "--distill", mode]
    assert train.main(argv) == 0
    saved = read_info(tmp_path / "student.json")
    assert saved.recipe["distill"] == mode and saved.recipe["steps"] == 2
    assert saved.recipe["distill_heads"] == "cls<-labels, dist<-teacher"
    assert "epoch" in capsys.readouterr().out


# -- time limit ------------------------------------------------------------------------------


def simulate_budget(
    step_seconds: list[float], limit_s: float = 60.0, requested: int = 5000, steps_per_epoch: int = 100
) -> dict[str, float]:
    """Drive TimeBudget with a fake clock the way train.py does: steps, then 1 s of testing per epoch."""
    eval_s = 1.0
    budget = TimeBudget(limit_s, 0.0, requested, steps_per_epoch, 1, 1000, 100)
    now, step, total, cut = 0.0, 0, requested, False
    while step < total:
        total = budget.plan(step, total, now)
        if budget.out_of_time(now):
            cut = True
            break
        if step >= total:
            break
        now += step_seconds[min(step, len(step_seconds) - 1)]
        step += 1
        if step % steps_per_epoch == 0 or step >= total:
            now += eval_s
            budget.record_eval(eval_s)
    return {"steps": step, "total": total, "end": now, "cut": cut}


def test_time_budget_fits_schedule_to_limit() -> None:
    steady = simulate_budget([0.1])
    # The schedule ends by itself (not cut at a high LR), inside the limit, using most of it.
    assert not steady["cut"] and steady["steps"] == steady["total"]
    assert 45.0 < steady["end"] <= 60.0 - 1.0
    # GPU speeds up 4x after 150 steps (parallel runs finished): the schedule grows to use the time.
    slow = simulate_budget([0.2])
    faster = simulate_budget([0.2] * 150 + [0.05])
    assert not faster["cut"] and faster["end"] <= 59.0 and faster["steps"] > slow["steps"] + 100
    # A slow model where less than one epoch fits: planned within the first epoch.
    slow_model = simulate_budget([0.5], requested=50_000, steps_per_epoch=10_000)
    assert not slow_model["cut"] and 40.0 < slow_model["end"] <= 59.0
    # Plenty of time: the requested schedule is kept.
    assert simulate_budget([0.001], requested=2000)["steps"] == 2000


# -- train.py / evaluate.py ------------------------------------------------------------------


def test_smoke_train_saves_checkpoint(smoke_run: tuple[Path, str]) -> None:
    out, stdout = smoke_run
    for suffix in (".safetensors", ".json", ".md"):
        assert (out / f"tiny-vit{suffix}").exists()
    raw = json.loads((out / "tiny-vit.json").read_text())
    assert CHECKPOINT_FIELDS <= raw.keys()
    assert raw["class_names"] == CIFAR10_CLASSES
    assert raw["model_kwargs"] == {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10}
    assert raw["recipe"]["steps"] == 3 and raw["seed"] == 3
    assert raw["command"].startswith("python scripts/train.py --smoke --max-steps 3")
    assert 0.0 <= raw["test_accuracy"] <= 100.0
    assert "epoch" in stdout and json.loads(stdout.strip().splitlines()[-1])["steps"] == 3


def test_evaluate_reproduces_saved_accuracy(
    smoke_run: tuple[Path, str], data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = smoke_run
    evaluate = load_script("evaluate")
    weights = out / "tiny-vit.safetensors"
    assert evaluate.main(["--checkpoint", str(weights), "--data", str(data_root / "test"),
                          "--batch-size", "7", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["total"] == 40
    assert result["accuracy"] == pytest.approx(read_info(out / "tiny-vit.json").test_accuracy, abs=1e-9)


def test_evaluate_refuses_bad_input(
    smoke_run: tuple[Path, str], data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = smoke_run
    evaluate = load_script("evaluate")
    weights = str(out / "tiny-vit.safetensors")
    assert evaluate.main(["--checkpoint", "no-such-id", "--data", str(data_root / "test")]) != 0
    assert evaluate.main(["--checkpoint", weights, "--data", str(tmp_path / "missing")]) != 0
    assert evaluate.main(["--checkpoint", weights, "--data", str(data_root)]) != 0  # root, not split
    other = make_synthetic_imagefolder(tmp_path / "other", num_classes=3, per_class=1, splits=("test",))
    assert evaluate.main(["--checkpoint", weights, "--data", str(other / "test")]) != 0
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("evaluate.py: error: ") for line in errors)
    assert "point --data at the split" in errors[2]
    assert "differ from the checkpoint's classes" in errors[3]


def test_init_continues_from_a_checkpoint(smoke_run: tuple[Path, str], data_root: Path, tmp_path: Path) -> None:
    out, _ = smoke_run
    train = load_script("train")
    start = out / "tiny-vit.safetensors"
    # lr 0: the second stage cannot move the weights, so they must be the --init weights exactly.
    argv = ["--smoke", *TINY_VIT, "--data", str(data_root), "--out", str(tmp_path), "--checkpoint-id", "stage2",
            "--init", str(start), "--lr", "0"]
    assert train.main(argv) == 0
    before, after = load_tensors(start), load_tensors(tmp_path / "stage2.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    first, second = read_info(out / "tiny-vit.json"), read_info(tmp_path / "stage2.json")
    assert second.test_accuracy == pytest.approx(first.test_accuracy)  # same weights, same test set
    assert second.recipe["init_from"]["test_accuracy"] == first.test_accuracy
    assert second.epochs == first.epochs + 1
    assert second.command.splitlines()[0] == first.command and "--init" in second.command.splitlines()[1]
    assert "Trained in stages" in second.notes
    card = (tmp_path / "stage2.md").read_text()
    assert f"- init_from: {start} ({first.test_accuracy}% after {first.epochs} epochs" in card
    # Another model (or config) than the one stored is refused, not silently half-loaded.
    other = ["--smoke", *TINY_DEIT, "--data", str(data_root), "--out", str(tmp_path), "--init", str(start)]
    with pytest.raises(SystemExit, match="--init .* is vit_tiny_patch16_224"):
        train.main(other)


# -- BatchNorm recalibration -----------------------------------------------------------------


def test_recalibrate_batchnorm_sets_population_statistics(data_root: Path) -> None:
    data = load_imagefolder(data_root / "train", cache=False)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    torch.manual_seed(0)
    # Dropout first: if recalibration ran it in train mode, the statistics would not match below.
    model = torch.nn.Sequential(
        torch.nn.Dropout(0.5), torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10),
    )
    norm = model[2]
    norm.running_mean.fill_(5.0)
    norm.running_var.fill_(9.0)
    model.train()
    with torch.no_grad():  # independent: the conv's output over the whole split
        features = model[1](normalize(to_unit_float(data.images), mean, std)).double()
    expected_mean = features.mean(dim=(0, 2, 3))
    expected_var = features.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True)
    assert recalibrate_batchnorm(model, data, mean, std, batch_size=len(data)) == 1
    assert torch.allclose(norm.running_mean.double(), expected_mean, atol=1e-4)
    assert torch.allclose(norm.running_var.double(), expected_var, rtol=1e-4)
    assert norm.momentum == 0.1 and model.training and model[0].training  # all restored
    # Equal-sized batches: the cumulative average of batch means is the population mean.
    half = len(data) // 2
    assert len(data) % 2 == 0
    recalibrate_batchnorm(model, data, mean, std, batch_size=half)
    assert torch.allclose(norm.running_mean.double(), expected_mean, atol=1e-4)


def test_recalibrate_script_updates_the_card(data_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    import timm

    model = timm.create_model("resnet10t", num_classes=10)
    info = CheckpointInfo("bn", "resnet10t", {"num_classes": 10}, class_names=list(CIFAR10_CLASSES),
                          test_accuracy=1.0, command="python scripts/train.py ...", wall_time_s=10.0)
    for module in model.modules():  # stale statistics, as after a short run
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.fill_(100.0)
    save_checkpoint(model.state_dict(), info, tmp_path / "in")
    script = load_script("recalibrate_bn")
    assert script.main(["--checkpoint", str(tmp_path / "in" / "bn.safetensors"), "--data", str(data_root),
                        "--out", str(tmp_path / "out"), "--images", "20", "--threads", "1"]) == 0
    saved = read_info(tmp_path / "out" / "bn.json")
    step = saved.recipe["bn_recalibration"]
    assert step["train_images"] == 20 and step["layers"] == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()
    )
    assert saved.command.splitlines()[0] == info.command and "recalibrate_bn.py" in saved.command
    stored = load_tensors(tmp_path / "out" / "bn.safetensors")
    assert all(not torch.equal(stored[k], torch.full_like(stored[k], 100.0)) for k in stored if k.endswith("running_var"))
    for key, value in model.state_dict().items():  # weights untouched (to fp16)
        if not key.split(".")[-1].startswith(("running_", "num_batches")):
            assert torch.equal(stored[key], value.half().float()), key
    evaluate = load_script("evaluate")
    assert evaluate.main(["--checkpoint", str(tmp_path / "out" / "bn.safetensors"),
                          "--data", str(data_root / "test"), "--threads", "1"]) == 0

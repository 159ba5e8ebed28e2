"""Every bundled family trains: `scripts/train.py --smoke` for each checkpoint's model, on CI.

Besides running, the saved weights must reload strictly into a freshly built model, and so must
the bundled checkpoint of that family (a changed architecture would silently orphan it).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from vizlib.checkpoints import list_checkpoints, load_tensors, read_info
from vizlib.training import make_synthetic_imagefolder

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = {info.checkpoint_id: info for info in list_checkpoints()}
FAMILIES = sorted({(info.model, json.dumps(info.model_kwargs, sort_keys=True)) for info in BUNDLED.values()})


def load_train_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hybridlens_train", ROOT / "scripts" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_imagefolder(tmp_path_factory.mktemp("synthetic"), per_class=2, seed=2)


def test_every_family_has_a_bundled_checkpoint() -> None:
    models = {info.model for info in BUNDLED.values()}
    for name in ("vit_cifar", "deit_cifar_distilled", "resnet_cifar", "fcvit_cifar", "mobile_former_cifar",
                 "moat_cifar", "conv2former_cifar", "cetnet_cifar"):
        assert name in models
    depths = {info.model_kwargs.get("ce_depth") for info in BUNDLED.values() if info.model == "cetnet_cifar"}
    assert depths == {1, 3, 5, 7}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("model", "kwargs"), FAMILIES, ids=[f"{m}{k}" for m, k in FAMILIES])
def test_smoke_training_and_checkpoint_round_trip(model: str, kwargs: str, data_root: Path, tmp_path: Path) -> None:
    train = load_train_script()
    argv = ["--smoke", "--model", model, "--model-kwargs", kwargs, "--data", str(data_root),
            "--out", str(tmp_path), "--checkpoint-id", "smoke", "--batch-size", "8"]
    if model == "deit_cifar_distilled":
        argv += ["--teacher", "resnet_cifar", "--distill", "hard"]
    assert train.main(argv) == 0
    info = read_info(tmp_path / "smoke.json")
    assert info.model == model and info.model_kwargs == {**json.loads(kwargs), **info.model_kwargs}
    assert info.recipe["steps"] == 2

    import timm

    rebuilt = timm.create_model(model, **info.model_kwargs).eval()
    rebuilt.load_state_dict(load_tensors(tmp_path / "smoke.safetensors"), strict=True)
    # Bundled weights load into the current architecture too (a changed config would break them).
    for bundled in BUNDLED.values():
        if bundled.model == model and json.dumps(bundled.model_kwargs, sort_keys=True) == kwargs:
            rebuilt.load_state_dict(load_tensors(bundled.weights_path), strict=True)

"""vizlib.weights: every source and wrapper form loads exactly; unsafe or unreachable ones fail fast."""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save_file

from vizlib import checkpoints, weights
from vizlib.checkpoints import CIFAR10_CLASSES, CheckpointInfo, save_checkpoint
from vizlib.weights import ModelCache, WeightsError, WeightSpec, load_model, parse_weights

TINY = "vit_tiny_patch16_224"
TINY_KWARGS: dict[str, Any] = {"img_size": 32, "depth": 2, "num_classes": 10}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(TINY, **TINY_KWARGS)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model: torch.nn.Module, state: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value.to(loaded[key].dtype), rtol=0, atol=atol)


@pytest.fixture
def empty_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    monkeypatch.setattr(checkpoints, "CHECKPOINT_DIR", directory)
    return directory


# --- parsing --------------------------------------------------------------------------------------


def test_parse_weights(tmp_path: Path) -> None:
    assert parse_weights("bundled") == WeightSpec("bundled")
    assert parse_weights(" HUB ") == WeightSpec("hub")
    assert parse_weights("file:hub") == WeightSpec("file", Path("hub"))
    assert parse_weights(str(tmp_path / "w.pth")) == WeightSpec("file", tmp_path / "w.pth")
    assert parse_weights(tmp_path / "w.pth").kind == "file"
    with pytest.raises(WeightsError):
        parse_weights("  ")


def test_hub_models_listed() -> None:
    assert len(weights.HUB_MODELS) == 5
    for name, label in weights.HUB_MODELS.items():
        assert timm.models.is_model_pretrained(name), name
        assert label


# --- local files ----------------------------------------------------------------------------------


WRAPPERS = {
    "plain": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3, "arch": TINY},
    "state_dict_ema": lambda sd: {"state_dict_ema": sd, "state_dict": {k: v * 0 for k, v in sd.items()}},
    "model": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    "module_prefix": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".tar"])
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_torch_files(tmp_path: Path, tiny_state: dict, wrapper: str, suffix: str) -> None:
    path = tmp_path / f"weights{suffix}"
    torch.save(WRAPPERS[wrapper](tiny_state), path)
    loaded = load_model(TINY, str(path), **TINY_KWARGS)
    assert loaded.source == "file" and not loaded.model.training
    assert loaded.class_names == CIFAR10_CLASSES
    assert_same(loaded.model, tiny_state)


@pytest.mark.parametrize("wrapper", ["plain", "module_prefix"])
def test_safetensors_files(tmp_path: Path, tiny_state: dict, wrapper: str) -> None:
    state = WRAPPERS[wrapper](tiny_state)
    state = state.get("state_dict", state)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert_same(load_model(TINY, path, **TINY_KWARGS).model, tiny_state)


def test_timm_training_checkpoint_with_args(tmp_path: Path, tiny_state: dict) -> None:
    import argparse

    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": tiny_state, "args": argparse.Namespace(lr=0.1), "metric": 91.5}, path)
    assert_same(load_model(TINY, path, **TINY_KWARGS).model, tiny_state)


def test_num_classes_inferred_from_head(tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "finetuned.pth"
    torch.save(tiny_state, path)
    loaded = load_model(TINY, path, img_size=32, depth=2)  # no num_classes: the head says 10
    assert loaded.model.num_classes == 10 and len(loaded.class_names) == 10


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_not_executed(tmp_path: Path, tiny_state: dict) -> None:
    marker = tmp_path / "pwned"
    zipped = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_state, "payload": Evil(marker)}, zipped)
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps({"payload": Evil(marker)}, protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(WeightsError):
            load_model(TINY, path, **TINY_KWARGS)
    assert not marker.exists()


def test_mismatch_names_keys(tmp_path: Path, tiny_state: dict) -> None:
    state = dict(tiny_state)
    state.pop("blocks.1.mlp.fc2.weight")
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"missing blocks\.1\.mlp\.fc2\.weight.*unexpected extra\.weight"):
        load_model(TINY, path, **TINY_KWARGS)
    shaped = dict(tiny_state)
    shaped["pos_embed"] = torch.zeros(1, 7, 192)
    path = tmp_path / "shape.safetensors"
    save_file(shaped, str(path))
    with pytest.raises(WeightsError, match=r"wrong shape pos_embed"):
        load_model(TINY, path, **TINY_KWARGS)


def test_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_model(TINY, tmp_path / "missing.pth")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="safetensors"):
        load_model(TINY, junk)
    junk_pth = tmp_path / "junk.pth"
    junk_pth.write_bytes(b"not a torch file at all")
    with pytest.raises(WeightsError):
        load_model(TINY, junk_pth)
    other = tmp_path / "weights.onnx"
    other.write_bytes(b"x")
    with pytest.raises(WeightsError, match="accepted file types"):
        load_model(TINY, other)
    no_tensors = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, no_tensors)
    with pytest.raises(WeightsError, match="No state dict"):
        load_model(TINY, no_tensors)
    with pytest.raises(WeightsError, match="neither a registered model"):
        load_model("no_such_model_xyz", junk_pth)
    monkeypatch.setattr(weights, "MAX_FILE_BYTES", 10)
    with pytest.raises(WeightsError, match="limit"):
        load_model(TINY, junk_pth)


# --- bundled --------------------------------------------------------------------------------------


def test_bundled_checkpoint(empty_checkpoints: Path, tiny_state: dict) -> None:
    info = CheckpointInfo(
        checkpoint_id="tiny_test_v1",
        model=TINY,
        model_kwargs=TINY_KWARGS,
        class_names=CIFAR10_CLASSES,
        test_accuracy=42.0,
        data="CIFAR-10",
    )
    save_checkpoint(tiny_state, info, empty_checkpoints)
    half = {k: v.half().float() if v.is_floating_point() else v for k, v in tiny_state.items()}
    by_id = load_model("tiny_test_v1")
    assert by_id.checkpoint is not None and by_id.checkpoint.checkpoint_id == "tiny_test_v1"
    assert by_id.name == TINY and by_id.class_names == CIFAR10_CLASSES and not by_id.model.training
    assert by_id.pretrained_cfg["input_size"][0] == 3
    assert "tiny_test_v1" in by_id.weights
    assert_same(by_id.model, half)
    by_name = load_model(TINY, "bundled", **TINY_KWARGS)
    assert_same(by_name.model, half)
    assert weights.available_sources("tiny_test_v1") == ["bundled", "file", "url"]
    assert weights.available_sources(TINY) == ["bundled", "hub", "file", "url"]
    with pytest.raises(WeightsError, match="no bundled checkpoint"):
        load_model(TINY, "bundled", img_size=64)


def test_no_bundled_checkpoint(empty_checkpoints: Path) -> None:
    with pytest.raises(WeightsError, match="no bundled checkpoint.*none are installed"):
        load_model(TINY)
    assert weights.available_sources("resnet18") == ["hub", "file", "url"]
    assert weights.available_sources("no_such_model_xyz") == ["file", "url"]


# --- hub ------------------------------------------------------------------------------------------

HUB_TINY = "deit_tiny_patch16_224.fb_in1k"


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)  # probe the endpoint itself, not a user's proxy
    return cache


def test_hub_unreachable_endpoint_fails_fast(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="unreachable.*bundled") as exc:
        load_model(HUB_TINY, "hub")
    assert time.perf_counter() - start < 1.0  # a refused connection needs no timeout
    assert "127.0.0.1" in str(exc.value)


def test_hub_dns_failure_fails_fast(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://hybridlens-no-such-host.invalid")
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="unreachable"):
        load_model(HUB_TINY, "hub")
    assert time.perf_counter() - start < 3.0


def test_hub_real_offline_fails_fast() -> None:
    if weights.cached_hub_file(HUB_TINY) is not None:
        pytest.skip("deit_tiny is in the local Hugging Face cache")
    if weights.is_reachable(weights.hub_endpoint()):
        pytest.skip("the Hugging Face Hub is reachable; not downloading weights in a unit test")
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="unreachable"):
        load_model(HUB_TINY, "hub")
    assert time.perf_counter() - start < 3.0


def test_hub_uses_local_cache_offline(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    state = timm.create_model(HUB_TINY).state_dict()
    snapshot = empty_hub_cache / "models--timm--deit_tiny_patch16_224.fb_in1k" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    loaded = load_model(HUB_TINY, "hub")
    assert loaded.source == "hub" and "cache" in loaded.weights
    assert len(loaded.class_names) == 1000 and loaded.class_names[0].startswith("tench")
    assert loaded.pretrained_cfg["crop_pct"] == 0.9
    assert_same(loaded.model, state)


def test_hub_offline_mode_and_unknown(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE"):
        load_model(HUB_TINY, "hub")
    assert time.perf_counter() - start < 1.0
    with pytest.raises(WeightsError, match="no pretrained weights"):
        load_model("no_such_model_xyz", "hub")


# --- cache ----------------------------------------------------------------------------------------


def test_model_cache_evicts_by_bytes() -> None:
    def linear(n: int) -> torch.nn.Module:
        return torch.nn.Linear(n, 1, bias=False)  # n float32 parameters = 4n bytes

    cache = ModelCache(max_bytes=4 * 250)
    loads: list[str] = []

    def loader(key: str, n: int) -> Any:
        return lambda: loads.append(key) or linear(n)

    a = cache.get_or_load("a", loader("a", 100))
    cache.get_or_load("b", loader("b", 100))
    assert cache.get_or_load("a", loader("a", 100)) is a  # hit, and "a" becomes most recent
    cache.get_or_load("c", loader("c", 100))  # 1200 bytes > 1000: evicts "b", the least recent
    assert cache.keys() == ["a", "c"] and cache.total_bytes == 800
    cache.get_or_load("huge", loader("huge", 1000))  # alone over budget: kept, everything else goes
    assert cache.keys() == ["huge"]
    assert loads == ["a", "b", "c", "huge"]


def test_model_cache_loads_once_across_threads() -> None:
    cache = ModelCache(max_bytes=2**20)
    calls: list[int] = []
    gate = threading.Event()

    def slow() -> torch.nn.Module:
        calls.append(1)
        gate.wait(2)
        return torch.nn.Linear(2, 2)

    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_load("k", slow))) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1 and len(results) == 4 and all(r is results[0] for r in results)


def test_model_cache_failed_load_not_cached() -> None:
    cache = ModelCache(max_bytes=2**20)

    def fail() -> Any:
        raise WeightsError("The hub is unreachable.")

    with pytest.raises(WeightsError):
        cache.get_or_load("k", fail)
    assert "k" not in cache
    assert isinstance(cache.get_or_load("k", lambda: torch.nn.Linear(1, 1)), torch.nn.Linear)


# --- URL ------------------------------------------------------------------------------------------


@pytest.fixture
def local_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A loopback HTTP server over tmp_path/served, and torch hub's cache redirected to tmp_path."""
    import functools
    import http.server

    served = tmp_path / "served"
    served.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_downloads_once_then_loads_from_cache(local_server: Any, tiny_state: dict) -> None:
    served, base = local_server
    save_file(tiny_state, str(served / "tiny.safetensors"))
    url = f"{base}/tiny.safetensors"
    assert parse_weights(url) == WeightSpec("url", url=url)
    loaded = load_model(TINY, url, **TINY_KWARGS)
    assert_same(loaded.model, tiny_state)
    assert loaded.source == "url" and url in loaded.weights
    (served / "tiny.safetensors").unlink()  # gone from the server: the cached copy serves now
    assert_same(load_model(TINY, url, **TINY_KWARGS).model, tiny_state)


def test_url_missing_and_unreachable_fail_with_one_sentence(local_server: Any) -> None:
    _, base = local_server
    with pytest.raises(WeightsError, match="failed"):
        load_model(TINY, f"{base}/missing.safetensors", **TINY_KWARGS)
    start = time.monotonic()
    with pytest.raises(WeightsError, match="unreachable"):
        load_model(TINY, "http://127.0.0.1:9/official.pth", **TINY_KWARGS)  # closed local port
    assert time.monotonic() - start < 3.0

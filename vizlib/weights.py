"""One interface for every model's weights: bundled checkpoints, the Hugging Face Hub, or a local file.

``load_model(name, weights)`` returns a :class:`LoadedModel` in eval mode whatever the source. Failures
raise :class:`WeightsError` with one user-facing sentence. Loading never executes pickled code:
safetensors where possible, otherwise ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import pickle
import socket
import sys
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import timm
import torch
from torch import nn

from vizlib import checkpoints
from vizlib.checkpoints import CIFAR10_CLASSES, CheckpointInfo

_log = logging.getLogger(__name__)

HUB_MODELS: dict[str, str] = {
    "deit_tiny_patch16_224.fb_in1k": "DeiT-Ti/16, ImageNet-1k (5.7 M params, fast)",
    "deit_base_patch16_224.fb_in1k": "DeiT-B/16, ImageNet-1k (86 M params)",
    "deit_base_distilled_patch16_224.fb_in1k": "DeiT-B/16 distilled, ImageNet-1k (87 M params)",
    "vit_base_patch16_224.augreg2_in21k_ft_in1k": "ViT-B/16 AugReg2, IN-21k -> IN-1k (86 M params)",
    "vit_large_patch16_224.augreg_in21k_ft_in1k": "ViT-L/16 AugReg, IN-21k -> IN-1k (304 M params)",
}

MAX_FILE_BYTES = 2 * 2**30
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")
# timm's preference order when a training checkpoint wraps the state dict (EMA weights first).
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
HUB_TIMEOUT_S = 2.0
HF_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm fetches when no filename is set

WeightsKind = Literal["bundled", "hub", "file", "url"]


class WeightsError(RuntimeError):
    """Weights that cannot be loaded; the message is one user-facing sentence."""


@dataclass(frozen=True)
class WeightSpec:
    """Where weights come from: the bundled checkpoint, the Hugging Face Hub, a local file, or a URL
    (e.g. an official checkpoint's direct download link)."""

    kind: WeightsKind
    path: Path | None = None
    url: str | None = None

    def __str__(self) -> str:
        if self.kind == "url":
            return str(self.url)
        return str(self.path) if self.kind == "file" else self.kind


@dataclass
class LoadedModel:
    """A ready-to-use model (eval mode) with what the UI needs to describe and feed it."""

    model: nn.Module
    name: str  # the timm architecture name it was created from
    weights: str  # human description of the weights
    pretrained_cfg: dict[str, Any]  # preprocessing (input_size, mean, std, crop_pct, ...)
    class_names: list[str]
    checkpoint: CheckpointInfo | None = None
    source: WeightsKind = "bundled"
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def param_bytes(self) -> int:
        return module_bytes(self.model)


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (what a cache of models really costs)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# --- parsing and discovery ------------------------------------------------------------------------


def parse_weights(arg: str | os.PathLike | WeightSpec) -> WeightSpec:
    """``"bundled"``, ``"hub"``, an http(s) URL, or a file path (``"file:PATH"`` also works for a file
    named 'hub')."""
    if isinstance(arg, WeightSpec):
        return arg
    if isinstance(arg, os.PathLike):
        return WeightSpec("file", Path(arg).expanduser())
    text = str(arg).strip()
    if text.lower() == "bundled":
        return WeightSpec("bundled")
    if text.lower() == "hub":
        return WeightSpec("hub")
    if text.lower().startswith(("http://", "https://")):
        return WeightSpec("url", url=text)
    if text.lower().startswith("file:"):
        text = text[len("file:"):]
    if not text:
        raise WeightsError("No weights were given; use 'bundled', 'hub' or the path of a weights file.")
    return WeightSpec("file", Path(text).expanduser())


def register_project_models() -> None:
    """Import the project's model zoo so its families are registered with timm."""
    try:
        import models  # noqa: F401 -- registers every family as a side effect
    except ModuleNotFoundError as exc:
        if exc.name != "models":
            raise  # a family's own import failed: that is a real bug, not an absent zoo
        _log.debug("project model zoo not importable; only timm's own models are available")


def find_checkpoint(model_name: str, model_kwargs: Mapping[str, Any] | None = None) -> CheckpointInfo | None:
    """The bundled checkpoint for a checkpoint id, or for a model name (+ constructor kwargs)."""
    model_kwargs = dict(model_kwargs or {})
    # Read the module attribute at call time so tests (and tools) can point it elsewhere.
    infos = checkpoints.list_checkpoints(checkpoints.CHECKPOINT_DIR)
    for info in infos:
        if info.checkpoint_id == model_name:
            return info
    same_model = [i for i in infos if i.model == model_name]
    for info in same_model:
        if info.model_kwargs == model_kwargs:
            return info
    for info in same_model:  # kwargs the caller gave agree with the checkpoint's
        if all(info.model_kwargs.get(k) == v for k, v in model_kwargs.items()):
            return info
    return None


def has_hub_weights(model_name: str) -> bool:
    register_project_models()
    if model_name in HUB_MODELS:
        return True
    return timm.is_model(model_name) and timm.models.is_model_pretrained(model_name)


def available_sources(model_name: str) -> list[str]:
    """Weight sources that make sense for a model name or checkpoint id, in display order."""
    sources = []
    if find_checkpoint(model_name) is not None:
        sources.append("bundled")
    if has_hub_weights(model_name):
        sources.append("hub")
    sources += ["file", "url"]
    return sources


# --- loading --------------------------------------------------------------------------------------


def load_model(model_name: str, weights: str | os.PathLike | WeightSpec = "bundled", **model_kwargs: Any) -> LoadedModel:
    """Build ``model_name`` and load its weights from the given source; the model is in eval mode.

    ``model_name`` is a registered timm model name or, for bundled (and file) weights, a checkpoint id.
    ``model_kwargs`` go to ``timm.create_model``.
    """
    spec = parse_weights(weights)
    register_project_models()
    if spec.kind == "bundled":
        loaded = _load_bundled(model_name, model_kwargs)
    elif spec.kind == "hub":
        loaded = _load_hub(model_name, model_kwargs)
    elif spec.kind == "url":
        assert spec.url is not None
        loaded = _load_file(model_name, download_checkpoint(spec.url), model_kwargs)
        loaded.weights, loaded.source = f"{spec.url} (downloaded)", "url"
    else:
        assert spec.path is not None
        loaded = _load_file(model_name, spec.path, model_kwargs)
    loaded.model.eval()
    return loaded


def _create(name: str, kwargs: Mapping[str, Any], **extra: Any) -> nn.Module:
    if not timm.is_model(name):
        raise WeightsError(f"{name!r} is neither a registered model nor a bundled checkpoint.")
    try:
        return timm.create_model(name, **extra, **kwargs)
    except TypeError as exc:
        raise WeightsError(f"Model {name!r} does not accept the options {dict(kwargs)} ({exc}).") from None


def _model_cfg(model: nn.Module, name: str) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg:
        found = timm.models.get_pretrained_cfg(name)
        cfg = found.to_dict() if found is not None else {}
    # Drop in-memory/file pointers: the UI only needs preprocessing and labels from it.
    return {k: v for k, v in dict(cfg).items() if k not in ("state_dict", "file")}


def _class_names(model: nn.Module, count: int | None = None) -> list[str]:
    n = count if count is not None else int(getattr(model, "num_classes", 0) or 0)
    if n == len(CIFAR10_CLASSES):
        return list(CIFAR10_CLASSES)
    subset = timm.data.infer_imagenet_subset({"num_classes": n}) if n else None
    if subset is not None:
        return list(timm.data.ImageNetInfo(subset).label_descriptions())
    return [f"class {i}" for i in range(n)]


def _load_bundled(model_name: str, model_kwargs: dict[str, Any]) -> LoadedModel:
    info = find_checkpoint(model_name, model_kwargs)
    if info is None:
        ids = [i.checkpoint_id for i in checkpoints.list_checkpoints(checkpoints.CHECKPOINT_DIR)]
        listing = ", ".join(ids) if ids else "none are installed"
        raise WeightsError(f"There is no bundled checkpoint for {model_name!r} (bundled: {listing}).")
    kwargs = {**info.model_kwargs, **model_kwargs}
    model = _create(info.model, kwargs)
    path = checkpoints.CHECKPOINT_DIR / f"{info.checkpoint_id}.safetensors"
    try:
        tensors = checkpoints.load_tensors(path)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"The bundled checkpoint {info.checkpoint_id!r} could not be read ({exc}).") from None
    _load_strict(model, tensors, f"bundled checkpoint {info.checkpoint_id!r}", info.model)
    accuracy = "" if info.test_accuracy is None else f", {info.test_accuracy:.1f}% test accuracy"
    data = f" on {info.data}" if info.data else ""
    return LoadedModel(
        model=model,
        name=info.model,
        weights=f"bundled checkpoint {info.checkpoint_id}{data}{accuracy}",
        pretrained_cfg=_model_cfg(model, info.model),
        class_names=list(info.class_names) or _class_names(model),
        checkpoint=info,
        source="bundled",
        model_kwargs=kwargs,
    )


# --- Hugging Face Hub -----------------------------------------------------------------------------


def hub_endpoint() -> str:
    """The hub URL in effect, honouring HF_ENDPOINT even when set after huggingface_hub was imported."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


def _connect_target(url: str) -> tuple[str, int] | None:
    """Host and port a download of ``url`` would connect to first (the proxy, if one applies)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_parts.hostname:
            return proxy_parts.hostname, proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def is_reachable(url: str, timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or its proxy) opens within ``timeout`` seconds.

    DNS lookups cannot be given a timeout, so the probe runs in a daemon thread that is simply abandoned
    when time is up; the caller never waits longer than ``timeout``.
    """
    target = _connect_target(url)
    if target is None:
        return False
    host, port = target
    done = threading.Event()  # set when the probe has an answer either way (refusals are instant)
    ok: list[bool] = []
    deadline = time.monotonic() + timeout

    def probe() -> None:
        try:
            ok.append(_connect_any(host, port, deadline))
        finally:
            done.set()

    threading.Thread(target=probe, name="hybridlens-hub-probe", daemon=True).start()
    return done.wait(timeout) and bool(ok) and ok[0]


def url_cache_path(url: str) -> Path:
    """Where a downloaded checkpoint is kept: torch hub's cache, named by a hash of the URL."""
    name = Path(urlsplit(url).path).name or "checkpoint"
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(torch.hub.get_dir()) / "checkpoints" / "hybridlens" / f"{digest}-{name}"


def download_checkpoint(url: str) -> Path:
    """The local copy of ``url``: the cached one, else a download after a fast reachability probe
    (offline this fails within ``HUB_TIMEOUT_S`` instead of hanging on retries)."""
    target = url_cache_path(url)
    if target.exists():
        return target
    if not is_reachable(url):
        raise WeightsError(
            f"{urlsplit(url).hostname or url} is unreachable, so {url} cannot be downloaded; "
            "the bundled weights work offline."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as exc:  # any network or HTTP failure becomes one sentence
        raise WeightsError(f"Downloading {url} failed ({type(exc).__name__}: {exc}).") from exc
    return target


def _connect_any(host: str, port: int, deadline: float) -> bool:
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(remaining)
                sock.connect(address)
        except OSError:
            continue
        return True
    return False


def cached_hub_file(model_name: str) -> Path | None:
    """The locally cached weights file timm would download for ``model_name``, if present."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_DEFAULT_FILES
        for filename in names:
            found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if isinstance(cfg.url, str) and cfg.url:
        name = os.path.basename(urlsplit(cfg.url).path)
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / name
        if name and candidate.is_file():
            return candidate
    return None


def _load_hub(model_name: str, model_kwargs: dict[str, Any]) -> LoadedModel:
    if not has_hub_weights(model_name):
        raise WeightsError(f"{model_name!r} has no pretrained weights on the Hugging Face Hub.")
    cfg = timm.models.get_pretrained_cfg(model_name)
    cached = cached_hub_file(model_name)
    if cached is not None:
        # timm would still contact the hub to check for updates; loading the cached file directly
        # keeps it offline (timm's own loader reads it with safetensors or weights_only torch.load).
        overlay = {"file": str(cached), "source": ""}
        model = _create(model_name, model_kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
        where = "the local Hugging Face cache"
    else:
        url = hub_endpoint() if cfg is not None and cfg.hf_hub_id else str(getattr(cfg, "url", "") or "")
        host = urlsplit(url).hostname or url
        if _hub_offline():
            raise WeightsError(
                f"Hugging Face Hub access is switched off (HF_HUB_OFFLINE) and {model_name!r} is not in the "
                "local cache; the bundled weights work offline."
            )
        if not is_reachable(url):
            raise WeightsError(
                f"The Hugging Face Hub ({host}) is unreachable, so the pretrained weights of {model_name!r} "
                "cannot be downloaded; the bundled weights work offline."
            )
        try:
            model = _create(model_name, model_kwargs, pretrained=True)
        except WeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 -- network stacks raise many unrelated exception types
            raise WeightsError(
                f"Downloading the pretrained weights of {model_name!r} from {host} failed ({exc}); "
                "the bundled weights work offline."
            ) from None
        where = host
    return LoadedModel(
        model=model,
        name=model_name,
        weights=f"pretrained {model_name} ({HUB_MODELS.get(model_name, 'timm')}) from {where}",
        pretrained_cfg=_model_cfg(model, model_name),
        class_names=_class_names(model),
        source="hub",
        model_kwargs=dict(model_kwargs),
    )


# --- local files ----------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without executing code, unwrap training checkpoints, strip wrapper prefixes."""
    path = Path(path)
    name = path.name
    try:
        if not path.is_file():
            raise WeightsError(f"The weights file {name!r} does not exist.")
        size = path.stat().st_size
    except OSError as exc:  # permissions, over-long names, I/O errors
        raise WeightsError(f"The weights file {name!r} could not be read ({exc.strerror}).") from None
    if size > MAX_FILE_BYTES:
        raise WeightsError(
            f"The weights file is {size / 2**30:.1f} GB, larger than the {MAX_FILE_BYTES / 2**30:.0f} GB limit."
        )
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(f"{name!r} is not a valid safetensors file ({exc}).") from None
    elif suffix in TORCH_SUFFIXES:
        raw = _torch_load_weights_only(path)
    else:
        accepted = ", ".join((*SAFETENSORS_SUFFIXES, *TORCH_SUFFIXES))
        raise WeightsError(f"{name!r} is not a weights file; accepted file types are {accepted}.")
    return unwrap_state_dict(raw, name)


def _torch_load_weights_only(path: Path) -> Any:
    name = path.name
    # timm's training checkpoints store their argparse Namespace; it is a plain attribute bag, safe to
    # allow. Everything else outside tensors/containers/primitives is refused by the restricted unpickler.
    allow = torch.serialization.safe_globals([argparse.Namespace])
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():  # plain corruption, not a refused object
            raise WeightsError(f"{name!r} is not a readable PyTorch weights file ({exc}).") from None
        raise WeightsError(
            f"{name!r} contains Python objects other than tensors, which are refused because loading them "
            "could run arbitrary code; save a plain state_dict or safetensors instead."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, AttributeError, KeyError) as exc:
        raise WeightsError(f"{name!r} is not a readable PyTorch weights file ({exc}).") from None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, name: str = "the file") -> dict[str, torch.Tensor]:
    """Find the state dict inside a training checkpoint (timm's key order) and strip wrapper prefixes."""
    for _ in range(3):  # wrappers nest at most a couple of levels in practice
        if _is_tensor_dict(obj) or not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not _is_tensor_dict(obj):
        raise WeightsError(
            f"No state dict of tensors was found in {name!r} (looked for {', '.join(WRAPPER_KEYS)})."
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        clean = str(key)
        while clean.startswith(STRIP_PREFIXES):
            clean = clean.split(".", 1)[1]
        state[clean] = value
    return state


def _mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, wrong_shape


def _few(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _filter_fn(model: nn.Module) -> Callable[..., Any] | None:
    """timm's per-family converter from official checkpoint layouts, when the family has one."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    """Load with strict key and shape checking, trying timm's layout converter once on mismatch."""
    problems = _mismatch(model, state)
    if any(problems) and (convert := _filter_fn(model)) is not None:
        with contextlib.suppress(KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError):
            converted = convert(dict(state), model)
            if isinstance(converted, Mapping) and not any(_mismatch(model, converted)):
                state, problems = dict(converted), ([], [], [])
    missing, unexpected, wrong_shape = problems
    if missing or unexpected or wrong_shape:
        parts = [
            f"{label} {_few(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        ]
        raise WeightsError(f"The weights in {what} do not match model {name!r}: {'; '.join(parts)}.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"The weights in {what} could not be loaded into {name!r} ({exc}).") from None


def _classifier_classes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """Number of classes a state dict's classifier was trained for, when only the head disagrees."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    missing, unexpected, wrong_shape = _mismatch(model, state)
    if missing or unexpected or not wrong_shape or not heads:
        return None
    if not all(any(w.startswith(f"{h}.") for h in heads) for w in wrong_shape):
        return None
    weight = state.get(f"{heads[0]}.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def _load_file(model_name: str, path: Path, model_kwargs: dict[str, Any]) -> LoadedModel:
    info = None
    arch, kwargs = model_name, dict(model_kwargs)
    if not timm.is_model(model_name):
        # A checkpoint id names an architecture too (e.g. a re-trained bundled model).
        info = find_checkpoint(model_name)
        if info is not None:
            arch, kwargs = info.model, {**info.model_kwargs, **model_kwargs}
    if not timm.is_model(arch):
        raise WeightsError(f"{model_name!r} is neither a registered model nor a bundled checkpoint.")
    state = read_state_dict(path)
    model = _create(arch, kwargs)
    if "num_classes" not in kwargs and (classes := _classifier_classes(model, state)) is not None:
        # A fine-tuned file: rebuild with its head size rather than fail on the classifier shape.
        kwargs["num_classes"] = classes
        model = _create(arch, kwargs)
    _load_strict(model, state, f"file {path.name!r}", arch)
    names = list(info.class_names) if info is not None and info.class_names else _class_names(model)
    if len(names) != int(getattr(model, "num_classes", len(names)) or len(names)):
        names = _class_names(model)
    return LoadedModel(
        model=model,
        name=arch,
        weights=f"file {path.name}",
        pretrained_cfg=_model_cfg(model, arch),
        class_names=names,
        checkpoint=None,
        source="file",
        model_kwargs=kwargs,
    )


# --- cache ----------------------------------------------------------------------------------------

T = TypeVar("T")


def _sizeof(value: Any) -> int:
    if isinstance(value, LoadedModel):
        return value.param_bytes
    if isinstance(value, nn.Module):
        return module_bytes(value)
    return 0


class ModelCache:
    """A per-process LRU of loaded models bounded by parameter bytes; safe to share between threads.

    Concurrent requests for the same key load it once; different keys load in parallel. The most recently
    loaded entry is always kept, even when it alone exceeds ``max_bytes`` (the caller is using it).
    """

    def __init__(self, max_bytes: int, sizeof: Callable[[Any], int] = _sizeof) -> None:
        self.max_bytes = int(max_bytes)
        self._sizeof = sizeof
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}

    def get_or_load(self, key: Hashable, loader: Callable[[], T]) -> T:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:  # another thread may have finished loading it while we waited
                if key in self._entries:
                    self._entries.move_to_end(key)
                    return self._entries[key][0]
            try:
                value = loader()  # outside the main lock: other keys stay servable meanwhile
                size = int(self._sizeof(value))
            except BaseException:
                with self._lock:
                    self._key_locks.pop(key, None)
                raise
            with self._lock:
                # Insert and release the key lock together, so no thread sees "absent and not loading".
                self._entries[key] = (value, size)
                self._entries.move_to_end(key)
                self._key_locks.pop(key, None)
                self._evict()
            return value

    def _evict(self) -> None:
        total = sum(size for _, size in self._entries.values())
        while total > self.max_bytes and len(self._entries) > 1:
            _, (_, size) = self._entries.popitem(last=False)
            total -= size

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

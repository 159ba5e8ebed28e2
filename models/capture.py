"""The one capture mechanism every model in HybridLens uses to expose its internal maps.

Modules call :func:`record` inside ``forward``; nothing is stored unless the *calling thread* has
opened :func:`capturing`. The active recorder lives in a :class:`contextvars.ContextVar`, so two
Streamlit sessions (two threads) sharing one cached model each see only their own maps, and no
state or hook is left on the shared modules between calls.

Why not forward hooks or timm's fx ``AttentionExtract``: hooks are registered on the shared module,
so a concurrent call from another session would see (or steal) them, and the fx tracer is not
thread-safe (measured: four threads calling it at once break it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

_RECORDER: ContextVar[Recorder | None] = ContextVar("hybridlens_recorder", default=None)
_NAME_ATTR = "_capture_name"


class Recorder:
    """Ordered store of the maps recorded during one capture; keys follow execution order."""

    def __init__(self, select: Callable[[str], bool] | None = None, detach: bool = True) -> None:
        self.select = select
        self.detach = detach
        self.maps: OrderedDict[str, Any] = OrderedDict()

    def wants(self, name: str) -> bool:
        return self.select is None or self.select(name)

    def add(self, name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor) and self.detach:
            value = value.detach()
        if name in self.maps:  # a module called twice in one forward: keep both, in order
            index = 1
            while f"{name}#{index}" in self.maps:
                index += 1
            name = f"{name}#{index}"
        self.maps[name] = value


def is_capturing(name: str | None = None) -> bool:
    """True when the calling thread records maps (and, given a name, wants that one).

    Modules use it to switch from fused attention (which never materialises the map) to the
    explicit computation only while someone is looking.
    """
    recorder = _RECORDER.get()
    if recorder is None:
        return False
    return name is None or recorder.wants(name)


def capture_name(module: nn.Module) -> str:
    """The dotted path a module was given by :func:`name_capture_points` (its class name if none)."""
    return getattr(module, _NAME_ATTR, type(module).__name__)


def record(module: nn.Module, key: str, value: Any) -> None:
    """Store ``value`` as ``"<module path>.<key>"`` if the calling thread is capturing it."""
    recorder = _RECORDER.get()
    if recorder is None:
        return
    name = f"{capture_name(module)}.{key}"
    if recorder.wants(name):
        recorder.add(name, value)


def wants(module: nn.Module, key: str) -> bool:
    """True when :func:`record` of this module and key would store anything (skip costly maps)."""
    recorder = _RECORDER.get()
    return recorder is not None and recorder.wants(f"{capture_name(module)}.{key}")


def name_capture_points(model: nn.Module, prefix: str = "") -> nn.Module:
    """Give every submodule its dotted path once, at construction, so records carry stable names.

    This is construction-time metadata (like a parameter name), not per-call state.
    """
    for path, module in model.named_modules(prefix=prefix):
        object.__setattr__(module, _NAME_ATTR, path or type(model).__name__)
    return model


@contextmanager
def capturing(select: Callable[[str], bool] | None = None, detach: bool = True) -> Iterator[OrderedDict[str, Any]]:
    """Record the maps of every forward run by this thread inside the block.

    ``select`` filters by full name (e.g. ``lambda n: n.endswith(".attn")``); ``detach=False``
    keeps the autograd graph (for gradient-based views).
    """
    recorder = Recorder(select, detach)
    token = _RECORDER.set(recorder)
    try:
        yield recorder.maps
    finally:
        _RECORDER.reset(token)

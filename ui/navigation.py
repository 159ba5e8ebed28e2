"""The app's pages. Adding a page is one line in :data:`PAGES`; app.py and the tests read this list.

Page scripts live in ``app_pages/``, not ``pages/``: Streamlit treats a ``pages/`` folder next to app.py as
its legacy multipage mode, which runs a page's script without app.py (no ``st.navigation``, no shared
sidebar) in AppTest and on the first deep link after a server start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PageSpec:
    """One page: its script (relative to the repo root), menu title and Material icon."""

    path: str
    title: str
    icon: str
    default: bool = False  # the home page, served at "/"; other pages at /<file stem>


PAGES: tuple[PageSpec, ...] = (
    PageSpec("app_pages/home.py", "Home", ":material/home:", default=True),
    PageSpec("app_pages/vit_attention.py", "ViT attention", ":material/visibility:"),
    PageSpec("app_pages/fcvit_global_context.py", "FCViT global context", ":material/public:"),
    PageSpec("app_pages/conv2former_modulation.py", "Conv2Former modulation", ":material/blur_on:"),
    PageSpec("app_pages/mobile_former_bridge.py", "Mobile-Former bridge", ":material/hub:"),
    PageSpec("app_pages/moat_windows.py", "MOAT window vs global", ":material/grid_view:"),
    PageSpec("app_pages/receptive_field.py", "Receptive field & CE depth", ":material/filter_center_focus:"),
)


def st_pages() -> list[st.Page]:
    """``st.Page`` objects for ``st.navigation``, in menu order."""
    return [st.Page(ROOT / spec.path, title=spec.title, icon=spec.icon, default=spec.default) for spec in PAGES]

"""Small Streamlit building blocks every observation page reuses: the clickable patch image, download
buttons, lazily rendered tabs and range-safe widget state."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import streamlit as st
from plotly.graph_objects import Figure
from streamlit.delta_generator import DeltaGenerator
from streamlit_image_coordinates import streamlit_image_coordinates

from vizlib import figures, overlay


def clamp_state(key: str, low: int, high: int, default: int) -> int:
    """Keep a widget's stored value inside a new range (another model has another grid or depth).

    Call before the widget is created; Streamlit refuses a stored value outside min/max.
    """
    value = st.session_state.get(key, default)
    st.session_state[key] = min(max(int(value), low), high)
    return st.session_state[key]


def clickable_patches(image: np.ndarray, grid: tuple[int, int], *, key: str, row_key: str, col_key: str) -> None:
    """Show ``image`` (a rendered overlay); a click on it sets the ``row_key``/``col_key`` widgets.

    The callback runs before the rerun, so the number inputs may be created anywhere on the page.
    """

    def on_click() -> None:
        click = st.session_state.get(key)
        if click and click.get("width") and click.get("height"):
            row, col = overlay.pixel_to_patch(click["x"], click["y"], click["width"], click["height"], grid)
            st.session_state[row_key], st.session_state[col_key] = row, col

    # JPEG: the picture is sent on every rerun, and a photo overlay as PNG is several times larger.
    streamlit_image_coordinates(image, key=key, on_click=on_click, cursor="crosshair",
                                image_format="JPEG", jpeg_quality=90)


def downloads(name: str, png: bytes | None = None, fig: Figure | None = None, csv: str | None = None) -> None:
    """PNG (OpenCV), HTML (plotly, built only when clicked) and CSV buttons in one row."""
    columns = iter(st.columns(3))
    if png is not None:
        next(columns).download_button("PNG", png, f"{name}.png", "image/png", key=f"png_{name}",
                                      icon=":material/image:")
    if fig is not None:
        next(columns).download_button("HTML", lambda: figures.figure_html(fig), f"{name}.html", "text/html",
                                      key=f"html_{name}", icon=":material/code:")
    if csv is not None:
        next(columns).download_button("CSV", csv, f"{name}.csv", "text/csv", key=f"csv_{name}",
                                      icon=":material/table:")


def open_tab(names: Sequence[str], *, key: str) -> tuple[str, DeltaGenerator]:
    """Tabs where only the selected one is rendered (a click elsewhere on the page skips the others).

    Returns the open tab's name and container.
    """
    if st.session_state.get(key) not in names:
        st.session_state[key] = names[0]
    tabs = st.tabs(list(names), key=key, on_change="rerun")
    for name, tab in zip(names, tabs, strict=True):
        if tab.open:
            return name, tab
    return names[0], tabs[0]


def run_open_tab(renderers: dict[str, Callable[[], None]], *, key: str) -> None:
    """Render only the selected tab: ``renderers`` maps tab name -> function drawing its content."""
    name, tab = open_tab(list(renderers), key=key)
    with tab:
        renderers[name]()

"""Plotly figures and sentences for the effective receptive field (ERF) page. No Streamlit here.

Maps are drawn the way RepLKNet draws them: d = log10(map + 1) / max with seaborn's ``RdYlGn`` centred at 0,
which on [0, 1] data is the upper half of the scale (yellow = little contribution, green = the most).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots
from torch import Tensor

from vizlib import erf

# seaborn heatmap(cmap="RdYlGn", center=0) on data in [0, 1] uses only the colours above the middle.
ERF_COLORSCALE = [[k / 10, colour] for k, colour in
                  enumerate(sample_colorscale("RdYlGn", [0.5 + 0.05 * k for k in range(11)]))]
THRESHOLD_COLOURS = {0.2: "#1f77b4", 0.3: "#ff7f0e", 0.5: "#2ca02c", 0.99: "#9467bd"}
SERIES_DASHES = ("solid", "dash", "dot", "dashdot")
OUTLINE_THRESHOLD = 0.5
TILE_PX = 230


def _square_shape(side: int, h: int, w: int) -> dict[str, float]:
    """The centred square of ``side`` pixels, in heatmap cell coordinates (cells centred on integers)."""
    half = side // 2
    return {"x0": w // 2 - half - 0.5, "x1": w // 2 + half + 0.5, "y0": h // 2 - half - 0.5, "y1": h // 2 + half + 0.5}


def erf_figure(
    maps: Sequence[Sequence[Tensor | np.ndarray | None]],
    *,
    row_titles: Sequence[str],
    col_titles: Sequence[str],
    outline: float | None = OUTLINE_THRESHOLD,
    title: str = "",
) -> go.Figure:
    """A grid of log-scaled ERF maps (rows x cols of raw mean maps; None leaves a cell empty).

    ``outline`` draws the centred square holding that fraction of the log-scaled map (the area ratio's
    square). All tiles share one colour scale, 0 to 1, since each map is divided by its own maximum.
    """
    rows, cols = len(row_titles), len(col_titles)
    if len(maps) != rows or any(len(row) != cols for row in maps):
        raise ValueError(f"expected {rows} rows of {cols} maps")
    fig = make_subplots(rows=rows, cols=cols, column_titles=list(col_titles), row_titles=list(row_titles),
                        horizontal_spacing=0.02, vertical_spacing=0.04)
    for r, row in enumerate(maps):
        for c, raw in enumerate(row):
            if raw is None:
                continue
            values = raw if isinstance(raw, Tensor) else torch.as_tensor(np.asarray(raw, dtype=np.float64))
            d = erf.log_normalised(values).numpy()
            h, w = d.shape
            fig.add_trace(go.Heatmap(
                z=d, coloraxis="coloraxis", name=f"{row_titles[r]}, {col_titles[c]}",
                hovertemplate="x %{x}, y %{y}: %{z:.2f}<extra>%{fullData.name}</extra>",
            ), row=r + 1, col=c + 1)
            axis = fig.get_subplot(r + 1, c + 1)
            anchor = axis.xaxis.plotly_name.replace("axis", "")
            fig.update_xaxes(showticklabels=False, range=[-0.5, w - 0.5], row=r + 1, col=c + 1)
            fig.update_yaxes(showticklabels=False, range=[h - 0.5, -0.5], scaleanchor=anchor, row=r + 1, col=c + 1)
            if outline is not None:
                side = erf.square_sides(values, (outline,))[float(outline)]
                fig.add_shape(type="rect", **_square_shape(side, h, w), line={"color": "black", "width": 1,
                              "dash": "dot"}, row=r + 1, col=c + 1)
    fig.update_layout(
        title=title or None, height=rows * TILE_PX + 60, margin={"l": 10, "r": 40, "t": 50, "b": 10},
        coloraxis={"colorscale": ERF_COLORSCALE, "cmin": 0.0, "cmax": 1.0,
                   "colorbar": {"title": {"text": "log10(ERF+1)/max"}, "thickness": 12}},
    )
    return fig


def area_ratio_figure(
    ratios: Mapping[str, Mapping[str, Mapping[float, float]]],
    *,
    x_title: str = "CE depth",
    title: str = "",
) -> go.Figure:
    """Area ratio against x (CE depth, or model), one colour per threshold, one dash per series.

    ``ratios`` maps a series label (e.g. "trained", "at initialisation") to x label -> {threshold: ratio}.
    """
    fig = go.Figure()
    for s_index, (series, by_x) in enumerate(ratios.items()):
        xs = list(by_x)
        thresholds = sorted({t for values in by_x.values() for t in values})
        for t in thresholds:
            fig.add_trace(go.Scatter(
                x=xs, y=[float(by_x[x].get(t, np.nan)) for x in xs], mode="lines+markers",
                name=f"t = {t:g}, {series}", legendgroup=series,
                line={"color": THRESHOLD_COLOURS.get(t), "dash": SERIES_DASHES[s_index % len(SERIES_DASHES)]},
                hovertemplate=f"{series}, t = {t:g}<br>%{{x}}: r = %{{y:.3f}}<extra></extra>",
            ))
    fig.update_xaxes(title_text=x_title, type="category")
    fig.update_yaxes(title_text="area ratio r = side² / (H·W)", range=[0, 1.05])
    fig.update_layout(title=title or None, height=380, margin={"l": 10, "r": 10, "t": 50 if title else 20, "b": 10},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def ratio_rows(ratios: Mapping[str, Mapping[str, Mapping[float, float]]], x_name: str = "ce_depth"
               ) -> list[dict[str, object]]:
    """Flat table rows (series, x, r@t...) for a CSV download or a dataframe."""
    return [{"weights": series, x_name: x, **{f"r@{t:g}": round(float(r), 4) for t, r in values.items()}}
            for series, by_x in ratios.items() for x, values in by_x.items()]


def _path(values: Sequence[tuple[str, float]]) -> str:
    return " → ".join(f"{x}: {v:.2f}" for x, v in values)


def _shape(values: Sequence[float]) -> str:
    """The trend of 2-decimal readouts, so the words match the numbers shown."""
    rounded = [round(v, 2) for v in values]
    if len(set(rounded)) == 1:
        return "stays the same"
    steps = [b - a for a, b in zip(rounded, rounded[1:], strict=False)]
    if all(s >= 0 for s in steps):
        return "grows"
    if all(s <= 0 for s in steps):
        return "shrinks"
    return "goes up and down"


def depth_sentence(ratios: Mapping[str, Mapping[str, Mapping[float, float]]], threshold: float = 0.5) -> str:
    """What the on-screen area ratios at ``threshold`` do along x (CE depth), per series (trained, init)."""
    parts = []
    for series, by_x in ratios.items():
        points = [(x, float(values[threshold])) for x, values in by_x.items() if threshold in values]
        if len(points) < 2:
            continue
        parts.append(f"{series} it {_shape([v for _, v in points])} ({_path(points)})")
    if not parts:
        return ""
    return f"On these images the area ratio at t = {threshold:g}: " + "; ".join(parts) + "."


def models_sentence(ratios: Mapping[str, Mapping[str, Mapping[float, float]]], threshold: float = 0.5) -> str:
    """Area ratios at ``threshold`` of several models, per series, naming the widest ERF."""
    parts = []
    for series, by_x in ratios.items():
        points = {x: float(values[threshold]) for x, values in by_x.items() if threshold in values}
        if not points:
            continue
        listing = ", ".join(f"{x} {v:.3f}" for x, v in points.items())
        widest = max(points, key=points.__getitem__)
        parts.append(f"{series}: {listing} (widest: {widest})" if len(points) > 1 else f"{series}: {listing}")
    return f"Area ratio at t = {threshold:g} — " + "; ".join(parts) + "." if parts else ""

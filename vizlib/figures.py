"""Plotly figures of patch maps and per-layer metrics, plus the sentences that read them out.

Maps are drawn as heatmaps on the model's patch grid over the uint8 RGB crop the model saw, in crop
pixel coordinates (patch centres at ``(i + 0.5) * patch``), so hovering a cell gives its row, column
and value. No Streamlit here: pages only place these figures.
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from vizlib import overlay

METRIC_ORDER = (
    "query_independence", "head_independence", "entropy", "topk_mass", "gini", "mean_attention_distance",
)
METRIC_LABELS = {
    "query_independence": "query-independence",
    "head_independence": "head-independence",
    "entropy": "normalised entropy",
    "topk_mass": "top-5% mass",
    "gini": "Gini",
    "mean_attention_distance": "mean attention distance (px)",
}
# How to read each metric, for axis titles and sentences.
METRIC_HINTS = {
    "query_independence": "1 = every query sees the same map",
    "head_independence": "1 = every head sees the same map",
    "entropy": "1 = uniform, 0 = one patch",
    "topk_mass": "near 1 = a few patches hold the mass",
    "gini": "0 = uniform, near 1 = one patch",
    "mean_attention_distance": "pixels between query and attended patches",
}
COLORSCALE = "Inferno"  # matches overlay's default OpenCV colormap
MODEL_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
QUERY_COLOUR = "#00ffff"  # the same cyan as overlay.MARKER_COLOUR
TILE_PX = 190  # height of one row of small maps (paper view)
HEAD_TILE_PX = 240  # heads grids have 3-4 columns, so their tiles are wider


def image_source(image: np.ndarray, min_side: int = overlay.DISPLAY_SIDE) -> tuple[str, int]:
    """JPEG data URI of the crop upscaled by an integer factor (tiny CIFAR crops stay sharp), and the factor.

    JPEG because every subplot embeds its own copy and each rerun sends them all to the browser.
    """
    factor = overlay.display_scale(image.shape, min_side)
    jpeg = overlay.encode_jpeg(overlay.upscale(np.ascontiguousarray(image, dtype=np.uint8), factor))
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"), factor


def _as_stack(maps: object) -> np.ndarray:
    if hasattr(maps, "detach"):
        maps = maps.detach().cpu().numpy()
    return np.asarray(maps, dtype=np.float64)


def _cell_text(grid: tuple[int, int]) -> list[list[str]]:
    return [[f"row {r}, col {c}" for c in range(grid[1])] for r in range(grid[0])]


def _add_map(
    fig: go.Figure,
    image: np.ndarray,
    source: str,
    factor: int,
    values: np.ndarray,
    row: int | None = None,
    col: int | None = None,
    *,
    query: tuple[int, int] | None = None,
    opacity: float = 0.6,
    name: str = "",
    coloraxis: str | None = "coloraxis",
    zmin: float | None = None,
    zmax: float | None = None,
) -> None:
    """The crop as an image trace, the map as a translucent heatmap on top, the query outlined."""
    values = overlay.as_map(values)
    height, width = image.shape[:2]
    grid = values.shape
    dy, dx = height / grid[0], width / grid[1]
    where = {} if row is None else {"row": row, "col": col}
    fig.add_trace(go.Image(source=source, x0=0.5 / factor, dx=1 / factor, y0=0.5 / factor, dy=1 / factor,
                           hoverinfo="skip", name="image"), **where)
    heat = go.Heatmap(
        z=values, x0=dx / 2, dx=dx, y0=dy / 2, dy=dy, opacity=opacity, name=name,
        text=_cell_text(grid), hovertemplate="%{text}<br>value %{z:.4f}<extra>" + name + "</extra>",
    )
    if coloraxis:
        heat.update(coloraxis=coloraxis)
    else:
        heat.update(colorscale=COLORSCALE, zmin=zmin, zmax=zmax)
    fig.add_trace(heat, **where)
    if query is not None:
        qr, qc = query
        fig.add_shape(type="rect", x0=qc * dx, x1=(qc + 1) * dx, y0=qr * dy, y1=(qr + 1) * dy,
                      line={"color": QUERY_COLOUR, "width": 3}, **where)
    axis = {"visible": False}
    fig.update_xaxes(range=[0, width], constrain="domain", **axis, **where)
    fig.update_yaxes(range=[height, 0], scaleanchor=_anchor(fig, row, col), constrain="domain", **axis, **where)


def _anchor(fig: go.Figure, row: int | None, col: int | None) -> str:
    """The x axis id of a subplot, so each map keeps square pixels."""
    if row is None:
        return "x"
    subplot = fig.get_subplot(row, col)
    return subplot.xaxis.plotly_name.replace("axis", "")


def heatmap_over_image(
    image: np.ndarray,
    values: object,
    *,
    query: tuple[int, int] | None = None,
    title: str = "",
    opacity: float = 0.6,
    zmin: float | None = None,
    zmax: float | None = None,
    height: int = 430,
    colorbar_title: str = "attention",
) -> go.Figure:
    """One (h, w) map over the crop: the query's attention, or the rollout."""
    values = overlay.as_map(values)
    if zmin is not None or zmax is not None:  # plotly ignores a colour range with only one end set
        zmin = float(values.min()) if zmin is None else zmin
        zmax = float(values.max()) if zmax is None else zmax
    source, factor = image_source(image)
    fig = go.Figure()
    _add_map(fig, image, source, factor, values, query=query, opacity=opacity, name=title)
    fig.update_layout(
        title=title or None, height=height, margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10},
        coloraxis={"colorscale": COLORSCALE, "cmin": zmin, "cmax": zmax,
                   "colorbar": {"title": {"text": colorbar_title}, "thickness": 12}},
    )
    return fig


def heads_grid(
    image: np.ndarray,
    maps: object,
    *,
    query: tuple[int, int] | None = None,
    titles: Sequence[str] | None = None,
    cols: int | None = None,
    title: str = "",
) -> go.Figure:
    """(k, h, w) maps in a grid with ONE shared colour scale (heads are comparable at a glance)."""
    stack = _as_stack(maps)
    if stack.ndim != 3:
        raise ValueError(f"expected (k, h, w) maps, got shape {stack.shape}")
    count = stack.shape[0]
    titles = list(titles) if titles is not None else [f"head {i + 1}" for i in range(count)]
    cols = cols or min(count, 3 if count <= 9 else 4)  # tiles large enough to see a patch
    rows = -(-count // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles,
                        horizontal_spacing=0.02, vertical_spacing=0.12 / max(rows, 1))
    source, factor = image_source(image, min_side=TILE_PX)
    for index in range(count):
        r, c = divmod(index, cols)
        _add_map(fig, image, source, factor, stack[index], r + 1, c + 1, query=query, name=titles[index])
    fig.update_layout(
        title=title or None, height=rows * HEAD_TILE_PX + 70, margin={"l": 10, "r": 10, "t": 50, "b": 10},
        coloraxis={"colorscale": COLORSCALE, "cmin": 0.0, "cmax": float(stack.max()) if stack.size else 1.0,
                   "colorbar": {"title": {"text": "attention"}, "thickness": 12}},
    )
    return fig


def query_grid(
    image: np.ndarray,
    maps: object,
    *,
    queries: Sequence[tuple[int, int]],
    row_titles: Sequence[str],
    title: str = "",
) -> go.Figure:
    """The paper's figure view: rows are layers, columns are query patches, (rows, cols, h, w) maps.

    Query-independence shows as a row whose maps all look alike although the outlined query moves.
    """
    stack = _as_stack(maps)
    if stack.ndim != 4 or stack.shape[:2] != (len(row_titles), len(queries)):
        raise ValueError(
            f"expected ({len(row_titles)}, {len(queries)}, h, w) maps for the given rows and queries, "
            f"got shape {stack.shape}"
        )
    rows, cols = stack.shape[:2]
    fig = make_subplots(rows=rows, cols=cols, column_titles=[f"query ({q[0]}, {q[1]})" for q in queries],
                        row_titles=list(row_titles), horizontal_spacing=0.02, vertical_spacing=0.03)
    source, factor = image_source(image, min_side=TILE_PX)
    for r in range(rows):
        for c, q in enumerate(queries):
            # Each layer row gets its own scale: deep layers are far peakier than shallow ones.
            _add_map(fig, image, source, factor, stack[r, c], r + 1, c + 1, query=q,
                     name=f"{row_titles[r]}, query ({q[0]}, {q[1]})", coloraxis=None,
                     zmin=0.0, zmax=float(stack[r].max()))
    fig.update_traces(showscale=False, selector={"type": "heatmap"})
    fig.update_layout(title=title or None, height=rows * TILE_PX + 60,
                      margin={"l": 10, "r": 30, "t": 40, "b": 10})
    return fig


def metric_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    per_head: Mapping[str, Mapping[str, object]] | None = None,
    metrics: Sequence[str] = METRIC_ORDER,
    title: str = "",
) -> go.Figure:
    """One panel per metric, x = layer (1-based), one line per model of its head-mean.

    ``curves`` maps a model label to ``AttentionAnalysis.layer_means()``; ``per_head`` optionally maps
    the same labels to metric -> (layers, heads) arrays drawn as faint dots (the spread over heads).
    """
    cols = 3
    rows = -(-len(metrics) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[METRIC_LABELS.get(m, m) for m in metrics],
                        horizontal_spacing=0.07, vertical_spacing=0.16)
    for index, (model, values) in enumerate(curves.items()):
        colour = MODEL_COLOURS[index % len(MODEL_COLOURS)]
        for m_index, metric in enumerate(metrics):
            r, c = divmod(m_index, cols)
            ys = [float(v) for v in values[metric]]
            xs = list(range(1, len(ys) + 1))
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines+markers", name=model, legendgroup=model, showlegend=m_index == 0,
                line={"color": colour}, hovertemplate=f"{model}<br>layer %{{x}}: %{{y:.3f}}<extra></extra>",
            ), row=r + 1, col=c + 1)
            heads = None if per_head is None else per_head.get(model, {}).get(metric)
            if heads is not None:
                spread = _as_stack(heads)
                if spread.ndim == 2:
                    fig.add_trace(go.Scatter(
                        x=np.repeat(xs, spread.shape[1]), y=spread.reshape(-1), mode="markers",
                        name=f"{model}, single heads", legendgroup=model, showlegend=False,
                        marker={"color": colour, "size": 4, "opacity": 0.3}, hoverinfo="skip",
                    ), row=r + 1, col=c + 1)
            fig.update_xaxes(title_text="layer", dtick=1 if len(xs) <= 16 else None, row=r + 1, col=c + 1)
    fig.update_layout(title=title or None, height=rows * 290 + 40,
                      margin={"l": 10, "r": 10, "t": 60 if title else 40, "b": 10},
                      legend={"orientation": "h", "y": -0.12})
    return fig


def rollout_figure(image: np.ndarray, rollout: object, title: str = "Attention rollout") -> go.Figure:
    """Rollout divided by its maximum (the usual display, methods §1)."""
    values = overlay.as_map(rollout)
    peak = float(values.max())
    scaled = values / peak if peak > 0 else values
    return heatmap_over_image(image, scaled, title=title, zmin=0.0, zmax=1.0, colorbar_title="rollout / max")


def figure_html(fig: go.Figure) -> str:
    """A standalone HTML file with plotly.js inlined, so it opens offline (classrooms)."""
    return fig.to_html(include_plotlyjs=True, full_html=True)


# --- sentences -------------------------------------------------------------------------------------


def _trend(values: Sequence[float], label: str, digits: int = 2) -> str:
    first, last = float(values[0]), float(values[-1])
    fmt = f"{{:.{digits}f}}"
    if abs(last - first) < 0.5 * 10 ** (-digits):
        return f"{label} stays at {fmt.format(first)} from layer 1 to layer {len(values)}"
    verb = "rises" if last > first else "falls"
    return f"{label} {verb} from {fmt.format(first)} in layer 1 to {fmt.format(last)} in layer {len(values)}"


def trend_sentence(curves: Mapping[str, Sequence[float]], model: str) -> str:
    """What this model's numbers say about the FCViT claim (query-independent, sparse deep layers)."""
    qi, mass = curves["query_independence"], curves["topk_mass"]
    parts = [
        _trend(qi, "query-independence"),
        _trend(mass, "the top-5% mass"),
        _trend(curves["entropy"], "the normalised entropy"),
    ]
    # Differences below the 2-decimal readout count as "no change", so the verdict matches the numbers.
    more_independent = round(float(qi[-1]), 2) > round(float(qi[0]), 2)
    sparser = round(float(mass[-1]), 2) > round(float(mass[0]), 2)
    if more_independent and sparser:
        verdict = "as the paper observed, the last layer is more query-independent and sparser than the first"
    elif more_independent:
        verdict = "the last layer is more query-independent than the first, but not sparser"
    elif sparser:
        verdict = "the last layer is sparser than the first, but not more query-independent"
    else:
        verdict = "neither trend the paper observed shows from the first to the last layer"
    return f"For {model} on this image, {parts[0]}; {parts[1]}; {parts[2]}. So here {verdict}."


def comparison_sentence(curves: Mapping[str, Mapping[str, Sequence[float]]]) -> str:
    """Last-layer entropy and query-independence of two or more models side by side."""
    items = list(curves.items())
    entropy = ", ".join(f"{name} {float(v['entropy'][-1]):.2f}" for name, v in items)
    qi = ", ".join(f"{name} {float(v['query_independence'][-1]):.2f}" for name, v in items)
    last = {name: round(float(v["entropy"][-1]), 2) for name, v in items}
    smoothest = max(last, key=last.__getitem__)
    verdict = ("they attend equally smoothly" if len(set(last.values())) == 1
               else f"{smoothest} attends most smoothly")
    return (f"In the last layer the normalised entropy is {entropy} (higher is smoother), and the "
            f"query-independence is {qi}; on this image {verdict}.")


def prediction_text(logits: object, class_names: Sequence[str], k: int = 3) -> str:
    """The model's top-k classes with softmax probabilities, e.g. "cat 41%, dog 22%, frog 9.5%"."""
    scores = np.asarray(logits.detach().cpu().numpy() if hasattr(logits, "detach") else logits, dtype=np.float64)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:k]
    names = [class_names[i] if i < len(class_names) else f"class {i}" for i in map(int, top)]
    # Short ImageNet names ("tabby, tabby cat" -> "tabby"); small probabilities keep a decimal.
    return ", ".join(f"{n.split(',')[0]} {_percent(probs[i])}" for n, i in zip(names, top, strict=True))


def _percent(p: float) -> str:
    return f"{100 * p:.0f}%" if p >= 0.095 else f"{100 * p:.1f}%"


def table_csv(rows: Sequence[Mapping[str, object]]) -> str:
    """A list of dicts (e.g. ``metric_table()``) as CSV text, columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()

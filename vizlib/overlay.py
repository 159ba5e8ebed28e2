"""OpenCV rendering of patch maps over images: what the PNG downloads and the clickable image show.

Everything works on uint8 RGB arrays (H, W, 3) and (h, w) maps on the model's patch grid. Maps are
upsampled with nearest neighbour on purpose: one patch is one value, so the picture never suggests
detail the model does not have.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

COLORMAPS: dict[str, int] = {
    "inferno": cv2.COLORMAP_INFERNO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
}
GRID_COLOUR = (255, 255, 255)
MARKER_COLOUR = (0, 255, 255)  # cyan: not in inferno/viridis, so the query never blends into the map
DISPLAY_SIDE = 384  # the clickable image and PNGs are at least this many pixels on their long side


def as_map(values: np.ndarray | Sequence[Sequence[float]] | object) -> np.ndarray:
    """A (h, w) float64 array from a numpy array, nested lists or a torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()  # torch tensor, without importing torch here
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a (h, w) map, got shape {arr.shape}")
    return arr


def normalise(values: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale to [0, 1] (min-max unless limits are given); a constant map becomes all zeros."""
    arr = np.nan_to_num(np.asarray(values, dtype=np.float64))
    lo = float(arr.min()) if vmin is None else float(vmin)
    hi = float(arr.max()) if vmax is None else float(vmax)
    if hi <= lo:
        return np.zeros_like(arr)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def display_scale(shape: Sequence[int], min_side: int = DISPLAY_SIDE) -> int:
    """Integer upscale factor so the long side reaches ``min_side`` (32 px CIFAR crops become 384 px).

    Integer factors keep every patch an exact block of display pixels.
    """
    long_side = max(int(shape[0]), int(shape[1]))
    return max(1, int(np.ceil(min_side / max(long_side, 1))))


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor (pixels stay square and sharp)."""
    if factor == 1:
        return image
    height, width = image.shape[:2]
    return cv2.resize(image, (width * factor, height * factor), interpolation=cv2.INTER_NEAREST)


def upsample_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) patch map -> (H, W) float map where each patch covers its block of pixels.

    When H is not a multiple of h (a crop larger than grid x patch), the blocks cover the image evenly.
    """
    arr = as_map(values)
    height, width = int(size[0]), int(size[1])
    rows = (np.arange(height) * arr.shape[0]) // height  # pixel y lies in patch floor(y * h / H)
    cols = (np.arange(width) * arr.shape[1]) // width
    return arr[rows[:, None], cols[None, :]]


def colorize(values01: np.ndarray, colormap: str = "inferno") -> np.ndarray:
    """[0, 1] map -> uint8 RGB with an OpenCV colormap (the same names plotly uses)."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of {sorted(COLORMAPS)}")
    grey = np.clip(np.rint(np.asarray(values01) * 255.0), 0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(grey, COLORMAPS[colormap])
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def blend(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """alpha * heat + (1 - alpha) * image, both uint8 RGB of the same size."""
    if image.shape != heat.shape:
        raise ValueError(f"image {image.shape} and heat map {heat.shape} differ in size")
    return cv2.addWeighted(heat, float(alpha), image, 1.0 - float(alpha), 0.0)


def patch_box(grid: Sequence[int], size: Sequence[int], row: int, col: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) display pixels of patch (row, col), inclusive-exclusive, same split as upsample."""
    rows, cols = int(grid[0]), int(grid[1])
    height, width = int(size[0]), int(size[1])
    return _edge(col, width, cols), _edge(row, height, rows), _edge(col + 1, width, cols), _edge(row + 1, height, rows)


def _edge(index: int, pixels: int, cells: int) -> int:
    # ceil(index * pixels / cells): the first pixel y with floor(y * cells / pixels) == index.
    return -((-index * pixels) // cells)


def draw_grid(image: np.ndarray, grid: Sequence[int], colour: tuple[int, int, int] = GRID_COLOUR,
              alpha: float = 0.35) -> np.ndarray:
    """Thin translucent patch-grid lines, so the user sees what one "query patch" is."""
    lines = image.copy()
    height, width = image.shape[:2]
    rows, cols = int(grid[0]), int(grid[1])
    for r in range(1, rows):
        y = _edge(r, height, rows)
        cv2.line(lines, (0, y), (width - 1, y), colour, 1)
    for c in range(1, cols):
        x = _edge(c, width, cols)
        cv2.line(lines, (x, 0), (x, height - 1), colour, 1)
    return cv2.addWeighted(lines, alpha, image, 1.0 - alpha, 0.0)


def draw_marker(image: np.ndarray, grid: Sequence[int], row: int, col: int,
                colour: tuple[int, int, int] = MARKER_COLOUR) -> np.ndarray:
    """Outline the query patch (inside its own box, so the map value under it stays visible)."""
    out = image.copy()
    x0, y0, x1, y1 = patch_box(grid, image.shape[:2], row, col)
    thickness = max(1, min(x1 - x0, y1 - y0) // 12)
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, thickness)
    return out


def render_overlay(
    image: np.ndarray,
    values: np.ndarray,
    grid: Sequence[int] | None = None,
    query: tuple[int, int] | None = None,
    *,
    alpha: float = 0.6,
    colormap: str = "inferno",
    vmin: float | None = None,
    vmax: float | None = None,
    show_grid: bool = True,
    min_side: int = DISPLAY_SIDE,
) -> np.ndarray:
    """The picture a user looks at: image upscaled, map coloured and blended, grid and query drawn.

    ``image`` is the model's uint8 RGB crop; ``values`` the (h, w) map on its patch grid.
    """
    values = as_map(values)
    grid = tuple(grid) if grid is not None else values.shape
    base = upscale(np.ascontiguousarray(image, dtype=np.uint8), display_scale(image.shape, min_side))
    heat = colorize(normalise(upsample_map(values, base.shape[:2]), vmin, vmax), colormap)
    out = blend(base, heat, alpha)
    if show_grid:
        out = draw_grid(out, grid)
    if query is not None:
        out = draw_marker(out, grid, *query)
    return out


def image_with_grid(image: np.ndarray, grid: Sequence[int], query: tuple[int, int] | None = None,
                    min_side: int = DISPLAY_SIDE) -> np.ndarray:
    """The bare crop upscaled, with the patch grid and the query marker (no map)."""
    out = draw_grid(upscale(np.ascontiguousarray(image, dtype=np.uint8), display_scale(image.shape, min_side)), grid)
    return draw_marker(out, grid, *query) if query is not None else out


def label(image: np.ndarray, text: str, height: int = 22) -> np.ndarray:
    """Add a white caption strip under a tile (PNG downloads carry their own titles)."""
    width = image.shape[1]
    strip = np.full((height, width, 3), 255, dtype=np.uint8)
    scale = 0.45
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    while tw > width - 4 and scale > 0.25:  # shrink long captions to fit narrow tiles
        scale -= 0.05
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    origin = (max(2, (width - tw) // 2), (height + th) // 2)
    cv2.putText(strip, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([image, strip])


def tile(images: Sequence[np.ndarray], cols: int, pad: int = 6,
         background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Lay equal-sized RGB tiles out row by row (heads grid, query side-by-side PNGs)."""
    if not images:
        raise ValueError("nothing to tile")
    cols = max(1, min(int(cols), len(images)))
    rows = -(-len(images) // cols)
    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    canvas = np.empty((rows * height + (rows + 1) * pad, cols * width + (cols + 1) * pad, 3), dtype=np.uint8)
    canvas[:] = background
    for index, im in enumerate(images):
        r, c = divmod(index, cols)
        y, x = pad + r * (height + pad), pad + c * (width + pad)
        canvas[y:y + im.shape[0], x:x + im.shape[1]] = im
    return canvas


def encode_png(image: np.ndarray) -> bytes:
    """uint8 RGB (or grey) array -> PNG file bytes."""
    arr = np.ascontiguousarray(image, dtype=np.uint8)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    ok, buffer = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {image.shape} as PNG")
    return buffer.tobytes()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """uint8 RGB array -> JPEG bytes: what figures embed (several times smaller than PNG for photos)."""
    arr = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {image.shape} as JPEG")
    return buffer.tobytes()


def pixel_to_patch(x: float, y: float, width: float, height: float, grid: Sequence[int]) -> tuple[int, int]:
    """A click at (x, y) on an image displayed at width x height -> (row, col) of the patch grid.

    Uses the displayed size (not the crop's), so it is right at any zoom; clicks on the last pixel
    edge are clamped into the grid.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"displayed size must be positive, got {width}x{height}")
    rows, cols = int(grid[0]), int(grid[1])
    row = int(np.clip(np.floor(y / height * rows), 0, rows - 1))
    col = int(np.clip(np.floor(x / width * cols), 0, cols - 1))
    return row, col


def relative_patch(query: tuple[int, int], grid: Sequence[int], other: Sequence[int]) -> tuple[int, int]:
    """The patch of grid ``other`` under the centre of ``query`` on ``grid`` (two models, two grids)."""
    row = int((query[0] + 0.5) * int(other[0]) / int(grid[0]))
    col = int((query[1] + 0.5) * int(other[1]) / int(grid[1]))
    return min(row, int(other[0]) - 1), min(col, int(other[1]) - 1)


def spread_queries(grid: Sequence[int], first: tuple[int, int], count: int = 4) -> list[tuple[int, int]]:
    """``first`` then patches at the quarter points of the grid, no repeats: the paper figure's queries."""
    rows, cols = int(grid[0]), int(grid[1])
    candidates = [(rows // 4, cols // 4), (rows // 4, (3 * cols) // 4), ((3 * rows) // 4, cols // 4),
                  ((3 * rows) // 4, (3 * cols) // 4), (rows // 2, cols // 2), (0, 0), (rows - 1, cols - 1)]
    out = [(int(first[0]), int(first[1]))]
    for candidate in candidates:
        if len(out) >= count:
            break
        if candidate not in out:
            out.append(candidate)
    return out


def relative_layer(layer: int, depth: int, other_depth: int) -> int:
    """The 1-based layer at the same relative depth in a model with ``other_depth`` layers (last -> last)."""
    if depth == other_depth:
        return int(layer)
    return min(max(1, round(int(layer) * int(other_depth) / max(int(depth), 1))), int(other_depth))

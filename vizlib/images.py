"""Image input shared by every page and the CLI: safe loading, bundled samples, timm-exact preprocessing.

Everything a user can upload goes through :func:`load_image`, so the rest of the app only ever sees a
fully decoded RGB ``PIL.Image`` of sane size. Failures raise :class:`ImageError` whose message is one
sentence that can be shown to the user as is.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

_log = logging.getLogger(__name__)
# Exceptions Pillow plugins raise on malformed data (besides their own OSError subclasses).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, struct.error)

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "samples"

# Pillow format names we decode; anything else is refused before any pixel is decoded.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
ACCEPTED_TEXT = "JPEG, PNG, WebP, BMP or GIF"
SAMPLE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
MIN_SIDE = 2

_SAMPLE_CAPTIONS = {
    "chelsea": "Chelsea the cat (scikit-image sample, CC0)",
    "coffee": "A cup of coffee (scikit-image sample, CC0)",
    "astronaut": "Astronaut Eileen Collins (scikit-image sample, NASA, public domain)",
    "rocket": "Falcon 9 launch of DSCOVR (scikit-image sample, SpaceX, public domain)",
}


class ImageError(ValueError):
    """An image the app cannot use; the message is one user-facing sentence."""


def _read_source(source: bytes | str | os.PathLike | BinaryIO, max_bytes: int) -> bytes:
    """Return the raw bytes, refusing oversized inputs before reading them whole."""
    limit_text = _format_bytes(max_bytes)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if not path.is_file():
                raise ImageError(f"The image file {path.name!r} does not exist.")
            size = path.stat().st_size
            if size > max_bytes:
                raise ImageError(
                    f"The image file is {_format_bytes(size)}, larger than the {limit_text} limit."
                )
            data = path.read_bytes()
        except OSError as exc:  # permissions, over-long names, I/O errors
            raise ImageError(f"The image file {path.name!r} could not be read ({exc.strerror}).") from None
    elif hasattr(source, "read"):
        if hasattr(source, "seek"):
            try:
                source.seek(0)  # Streamlit reruns hand us the same, already-read UploadedFile
            except (OSError, ValueError):
                pass
        data = source.read(max_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError("The uploaded file could not be read as binary data.")
        data = bytes(data)
    else:
        raise ImageError(f"Cannot read an image from a {type(source).__name__} object.")
    if len(data) > max_bytes:
        raise ImageError(f"The image file is larger than the {limit_text} limit.")
    if not data:
        raise ImageError("The image file is empty.")
    return data


def _format_bytes(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n} bytes"


def _bomb_error(limit: int) -> ImageError:
    return ImageError(f"The image declares more pixels than can be opened safely (limit {limit:,} pixels).")


def _open_header(data: bytes, limit: int) -> Image.Image:
    """Open (header only, no pixel decode) restricted to the accepted formats."""
    try:
        return Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    # The warning is only an exception when warnings are errors (e.g. pytest -W error); refuse it too.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bomb_error(limit) from None
    except UnidentifiedImageError:
        pass
    except _DECODE_ERRORS:
        raise ImageError("The file is corrupt and could not be read as an image.") from None
    # Not one of ours: tell a foreign image format (TIFF, ...) apart from non-image data.
    other = None
    try:
        with Image.open(io.BytesIO(data)) as probe:
            other = probe.format
    except (*_DECODE_ERRORS, Image.DecompressionBombError, Image.DecompressionBombWarning):  # any failure here means "not an image"
        other = None
    if other:
        raise ImageError(f"{other} images are not supported; please use {ACCEPTED_TEXT}.")
    raise ImageError(f"The file is not an image in a supported format ({ACCEPTED_TEXT}).")


def _pixel_limit(max_pixels: int) -> int:
    # Pillow warns above MAX_IMAGE_PIXELS; refusing at that limit ourselves keeps the warning unreachable
    # without touching the process-wide warnings filters (not thread-safe under Streamlit).
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return max_pixels if not pillow_limit else min(max_pixels, int(pillow_limit))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, compositing transparency on white."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im)), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map high-bit-depth grey levels to 0..255.

    Integer data is assumed to use its natural range (8 or 16 bit, which is what PNG/TIFF-style
    I/I;16 images hold); float data in [0, 1] is a normalised image; anything else is min-max scaled
    so that the picture is at least visible.
    """
    arr = values.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    arr = np.where(finite, arr, 0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if values.dtype.kind in "ui" and lo >= 0 and hi <= 255 and values.dtype.itemsize == 1:
        scaled = arr
    elif values.dtype.kind in "ui" and lo >= 0 and hi <= 65535:
        scaled = arr / 257.0  # 65535 -> 255 exactly, 257 -> 1
    elif values.dtype.kind == "f" and lo >= 0 and hi <= 1:
        scaled = arr * 255.0
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(arr)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def load_image(
    source: bytes | str | os.PathLike | BinaryIO,
    max_pixels: int = 40_000_000,
    max_bytes: int = 50 * 2**20,
) -> Image.Image:
    """Load, validate and fully decode an image into RGB.

    Accepts bytes, a path, or a binary file object (e.g. a Streamlit ``UploadedFile``). Animated images
    give their first frame; EXIF orientation is applied; transparency is composited on white.
    """
    data = _read_source(source, max_bytes)
    limit = _pixel_limit(max_pixels)
    opened = _open_header(data, limit)
    im = opened
    try:
        width, height = im.size
        # Checked on the header before decoding, so a bomb never allocates its pixel buffer.
        if width * height > limit:
            raise ImageError(
                f"The image is {width}x{height} pixels, more than the limit of {limit:,} pixels."
            )
        if width < MIN_SIDE or height < MIN_SIDE:
            raise ImageError(
                f"The image is only {width}x{height} pixels; it must be at least "
                f"{MIN_SIDE}x{MIN_SIDE} pixels."
            )
        try:
            im.seek(0)  # animated GIF/WebP: first frame
            # Forces the full decode now, so truncation surfaces here and not in a later page. (This relies
            # on Pillow's default ImageFile.LOAD_TRUNCATED_IMAGES = False, which HybridLens never changes.)
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _bomb_error(limit) from None
        except _DECODE_ERRORS:
            raise ImageError("The image file is truncated or corrupt and could not be decoded.") from None
        try:
            im = ImageOps.exif_transpose(im) or im
        except _DECODE_ERRORS as exc:  # broken EXIF blocks are common; the unrotated image is still useful
            _log.debug("ignoring unreadable EXIF orientation: %s", exc)
        try:
            rgb = _to_rgb(im)
        except (OSError, ValueError) as exc:
            raise ImageError(f"The image's colour mode {im.mode} could not be converted to RGB ({exc}).") from None
        if rgb is opened:
            rgb = opened.copy()  # detach from the file object so it can be closed
        return rgb
    finally:
        opened.close()


def list_samples() -> list[Path]:
    """The bundled sample images, sorted by file name."""
    if not SAMPLES_DIR.is_dir():
        return []
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES)


def sample_caption(path: str | os.PathLike) -> str:
    """A short human caption for a bundled sample (derived from its file name)."""
    stem = Path(path).stem
    if stem in _SAMPLE_CAPTIONS:
        return _SAMPLE_CAPTIONS[stem]
    if stem.startswith("cifar_"):
        return f"CIFAR-10 test image: {stem[len('cifar_'):].replace('_', ' ')} (32x32)"
    return stem.replace("_", " ").replace("-", " ").capitalize()


def _split_transform(transform: Any) -> tuple[list[Any], list[Any]]:
    """Split timm's eval Compose into PIL geometry steps and tensor steps (ToTensor onwards)."""
    steps = list(getattr(transform, "transforms", [transform]))
    for i, step in enumerate(steps):
        if "ToTensor" in type(step).__name__:
            return steps[:i], steps[i:]
    raise ValueError(f"timm transform has no ToTensor step: {transform}")


def preprocess(image: Image.Image, pretrained_cfg: dict) -> tuple[torch.Tensor, np.ndarray]:
    """Resize/crop/normalise exactly like timm's eval transform for ``pretrained_cfg``.

    Returns the ``(1, 3, H, W)`` float input tensor and the ``(H, W, 3)`` uint8 RGB crop it was made
    from (un-normalised), so overlays line up pixel for pixel with what the model saw.
    """
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    transform = create_transform(**config, is_training=False)
    pil_steps, tensor_steps = _split_transform(transform)
    crop = image if image.mode == "RGB" else image.convert("RGB")
    for step in pil_steps:
        crop = step(crop)
    crop_array = np.array(crop, dtype=np.uint8)  # copy: later edits never touch the PIL buffer
    tensor: Any = crop
    for step in tensor_steps:
        tensor = step(tensor)
    return tensor.unsqueeze(0).contiguous(), crop_array

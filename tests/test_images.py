"""vizlib.images: every bad input is refused with one sentence; every mode ends up as correct RGB."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from vizlib import images
from vizlib.images import ImageError, load_image, preprocess


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient(width: int = 40, height: int = 30) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def assert_one_sentence(exc: pytest.ExceptionInfo[ImageError]) -> None:
    message = str(exc.value)
    assert message and message[0].isupper() and message.endswith(".")
    assert "\n" not in message


# --- refused inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is plain text and not an image", np.random.default_rng(0).bytes(4096)],
    ids=["empty", "text", "random"],
)
def test_non_images_refused(data: bytes) -> None:
    with pytest.raises(ImageError) as exc:
        load_image(data)
    assert_one_sentence(exc)


def test_unsupported_format_names_accepted_ones() -> None:
    with pytest.raises(ImageError, match=r"TIFF.*JPEG, PNG, WebP, BMP or GIF") as exc:
        load_image(encode(gradient(), "TIFF"))
    assert_one_sentence(exc)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_refused(fmt: str) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(ImageError, match="truncated") as exc:
        load_image(data[: len(data) * 2 // 3])
    assert_one_sentence(exc)


def test_decompression_bomb_refused_from_header_without_allocating() -> None:
    # A valid PNG signature + IHDR declaring 100000x100000 RGB pixels (30 GB decoded), one tiny IDAT.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + png_chunk(b"IEND", b"")
    )
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageError, match="pixels") as exc:
            load_image(data)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 10 * 2**20
    assert_one_sentence(exc)


def test_max_pixels_checked_before_decoding() -> None:
    data = encode(gradient(100, 100), "PNG")
    with pytest.raises(ImageError, match="100x100"):
        load_image(data, max_pixels=5_000)
    assert load_image(data, max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize("side", [40, 100])  # Pillow's warning range, then its error range
@pytest.mark.parametrize("warnings_as", ["ignore", "error"])
def test_pillow_bomb_limits_become_image_error(
    monkeypatch: pytest.MonkeyPatch, side: int, warnings_as: str
) -> None:
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    with warnings.catch_warnings():
        warnings.simplefilter(warnings_as, Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="pixels"):
            load_image(encode(gradient(side, side), "PNG"))


def test_max_bytes() -> None:
    data = encode(gradient(), "PNG")
    with pytest.raises(ImageError, match="larger than"):
        load_image(data, max_bytes=len(data) - 1)
    with pytest.raises(ImageError, match="larger than"):
        load_image(io.BytesIO(data), max_bytes=len(data) - 1)
    assert load_image(data, max_bytes=len(data)).size == (40, 30)


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (7, 1)])
def test_tiny_images_refused(size: tuple[int, int]) -> None:
    with pytest.raises(ImageError, match="at least 2x2") as exc:
        load_image(encode(Image.new("RGB", size, (10, 20, 30)), "PNG"))
    assert f"{size[0]}x{size[1]}" in str(exc.value)
    assert_one_sentence(exc)


def test_two_by_two_accepted() -> None:
    assert load_image(encode(Image.new("RGB", (2, 2), (10, 20, 30)), "PNG")).size == (2, 2)


def test_missing_path() -> None:
    with pytest.raises(ImageError, match="does not exist"):
        load_image("/nonexistent/dir/cat.png")


# --- sources and formats --------------------------------------------------------------------------


def test_sources(tmp_path: Path) -> None:
    data = encode(gradient(), "PNG")
    path = tmp_path / "g.png"
    path.write_bytes(data)
    stream = io.BytesIO(data)
    stream.read(10)  # a Streamlit UploadedFile may have been read before: load_image rewinds
    expected = np.asarray(gradient())
    for source in (data, bytearray(data), str(path), path, stream):
        im = load_image(source)
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), expected)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "JPEG", "WEBP"])
def test_accepted_formats(fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    flat = Image.new("RGB", (16, 12), (200, 40, 90))
    kwargs = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    im = load_image(encode(flat, fmt, **kwargs))
    assert im.mode == "RGB" and im.size == (16, 12)
    tolerance = 0 if fmt in ("PNG", "BMP") else 6  # GIF quantises, JPEG/WebP are lossy
    assert np.abs(np.asarray(im).astype(int) - [200, 40, 90]).max() <= tolerance


# --- colour modes ---------------------------------------------------------------------------------


def test_grayscale_l() -> None:
    im = load_image(encode(Image.new("L", (4, 4), 100), "PNG"))
    assert np.all(np.asarray(im) == 100)


def test_one_bit() -> None:
    im = Image.new("1", (4, 4), 0)
    im.putpixel((0, 0), 1)
    arr = np.asarray(load_image(encode(im, "BMP")))
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[1, 1]) == (0, 0, 0)


def test_sixteen_bit_png_scaled_to_eight_bit() -> None:
    values = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    im16 = Image.fromarray(values)
    assert im16.mode.startswith("I;16")
    arr = np.asarray(load_image(encode(im16, "PNG")))
    np.testing.assert_array_equal(arr[..., 0], [[0, 100], [255, 200]])
    assert np.all(arr[..., 0] == arr[..., 2])


def test_int32_and_float_modes() -> None:
    as_int = Image.fromarray(np.array([[0, 257 * 50], [65535, 0]], dtype=np.int32), "I")
    np.testing.assert_array_equal(np.asarray(images._to_rgb(as_int))[..., 1], [[0, 50], [255, 0]])
    unit = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32), "F")
    np.testing.assert_array_equal(np.asarray(images._to_rgb(unit))[..., 0], [[0, 128], [255, 64]])
    wide = Image.fromarray(np.array([[-1.0, 0.0], [1.0, 3.0]], dtype=np.float32), "F")
    np.testing.assert_array_equal(np.asarray(images._to_rgb(wide))[..., 2], [[0, 64], [128, 255]])


def test_rgba_composited_on_white() -> None:
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0, 0)  # fully transparent -> white
    arr[0, 1] = (255, 0, 0, 255)  # opaque red stays red
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    arr[1, :] = (0, 0, 255, 255)
    out = np.asarray(load_image(encode(Image.fromarray(arr, "RGBA"), "PNG"))).astype(int)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (255, 0, 0)
    assert np.all(np.abs(out[0, 2] - 127) <= 1)
    assert tuple(out[1, 0]) == (0, 0, 255)


def test_rgb_colour_key_transparency() -> None:
    im = Image.new("RGB", (4, 4), (255, 0, 0))
    im.putpixel((0, 0), (0, 0, 255))
    out = np.asarray(load_image(encode(im, "PNG", transparency=(255, 0, 0))))
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 255)


def test_la_composited_on_white() -> None:
    arr = np.array([[[50, 0], [50, 255]], [[50, 255], [50, 255]]], dtype=np.uint8)
    out = np.asarray(load_image(encode(Image.fromarray(arr, "LA"), "PNG")))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (50, 50, 50)


def test_palette_with_and_without_transparency() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 128, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = np.asarray(load_image(encode(pal, "PNG")))
    assert tuple(out[0, 0]) == (0, 128, 0) and tuple(out[1, 1]) == (10, 20, 30)
    out = np.asarray(load_image(encode(pal, "PNG", transparency=0)))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (10, 20, 30)
    out = np.asarray(load_image(encode(pal, "GIF", transparency=0)))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (10, 20, 30)


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    cmyk.paste((255, 0, 0, 0), (0, 0, 8, 16))  # left half pure cyan
    out = np.asarray(load_image(encode(cmyk, "JPEG", quality=95))).astype(int)
    assert np.abs(out[8, 12] - [255, 255, 255]).max() <= 4
    assert np.abs(out[8, 2] - [0, 255, 255]).max() <= 4


# --- geometry and animation -----------------------------------------------------------------------


def test_exif_orientation_6_rotates_clockwise() -> None:
    arr = np.zeros((2, 4, 3), dtype=np.uint8)  # 4 wide, 2 high, red marker at top-left
    arr[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(encode(Image.fromarray(arr), "PNG", exif=exif))
    assert out.size == (2, 4)
    assert tuple(np.asarray(out)[0, 1]) == (255, 0, 0)  # top-left went to top-right
    jpeg = load_image(encode(Image.fromarray(np.zeros((20, 40, 3), np.uint8)), "JPEG", exif=exif))
    assert jpeg.size == (20, 40)


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert tuple(np.asarray(load_image(data))[4, 4]) == (255, 0, 0)


def test_animated_webp_first_frame() -> None:
    if not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert tuple(np.asarray(load_image(data))[4, 4]) == (255, 0, 0)


# --- samples and preprocessing --------------------------------------------------------------------


def test_samples_load() -> None:
    samples = images.list_samples()
    assert len(samples) >= 4
    assert samples == sorted(samples)
    for path in samples:
        assert load_image(path).mode == "RGB"
        caption = images.sample_caption(path)
        assert caption and "_" not in caption
    assert "cat" in images.sample_caption(Path("cifar_cat.jpg"))


CFGS = {
    "imagenet": {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9,
                 "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "cifar": {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0,
              "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "squash": {"input_size": (3, 48, 64), "interpolation": "bilinear", "crop_pct": 0.875,
               "crop_mode": "squash", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
}


@pytest.mark.parametrize("name", sorted(CFGS))
def test_preprocess_matches_timm(name: str) -> None:
    from timm.data import create_transform, resolve_data_config

    cfg = CFGS[name]
    image = gradient(300, 200)
    tensor, crop = preprocess(image, cfg)
    reference = create_transform(**resolve_data_config(pretrained_cfg=cfg))(image).unsqueeze(0)
    _, height, width = cfg["input_size"]
    assert tensor.shape == (1, 3, height, width) and tensor.dtype == torch.float32
    assert crop.shape == (height, width, 3) and crop.dtype == np.uint8
    torch.testing.assert_close(tensor, reference, rtol=0, atol=0)
    # The crop is exactly what was normalised.
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    from_crop = (torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255 - mean) / std
    torch.testing.assert_close(from_crop, tensor, rtol=0, atol=1e-5)


def test_preprocess_model_cfg() -> None:
    import timm

    cfg = timm.models.get_pretrained_cfg("deit_tiny_patch16_224.fb_in1k").to_dict()
    tensor, crop = preprocess(gradient(50, 80), cfg)
    assert tensor.shape == (1, 3, 224, 224) and crop.shape == (224, 224, 3)

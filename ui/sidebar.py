"""The shared sidebar image picker: bundled samples, an upload, or the camera.

``app.py`` calls :func:`image_picker` once per run, before the page runs, so its widgets live on every
page and keep their state when the user switches pages. Pages only read the result with
:func:`current_image` (or :func:`require_image`). The decoded image is kept in ``st.session_state``
and re-decoded only when the user picks something new.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st
from PIL import Image
from streamlit.runtime.uploaded_file_manager import UploadedFile

from vizlib import images

STATE_KEY = "hl_image"  # the current ImageChoice, or None after an unusable upload
TOKEN_KEY = "hl_image_token"  # what the current choice was made from, so reruns skip decoding
ERROR_KEY = "hl_image_error"
SOURCE_KEY = "hl_image_source"
SAMPLE_KEY = "hl_image_sample"
UPLOAD_KEY = "hl_image_upload"
CAMERA_KEY = "hl_image_camera"
LAST_SAMPLE_KEY = "hl_image_last_sample"  # survives the selectbox being hidden while another source is used
SOURCES = ("Sample", "Upload", "Camera")
UPLOAD_TYPES = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
DEFAULT_SAMPLE = "cifar_cat.jpg"  # the bundled models are CIFAR-10 models
THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class ImageChoice:
    """The image every page analyses, with a content hash to key caches on."""

    image: Image.Image = field(repr=False)
    digest: str
    label: str
    source: str
    thumbnail: Image.Image = field(repr=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def image_digest(image: Image.Image) -> str:
    """sha256 of the decoded pixels (not the file): the same picture re-uploaded hits the caches."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def make_choice(image: Image.Image, label: str, source: str) -> ImageChoice:
    thumbnail = image.copy()
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    if max(thumbnail.size) < THUMBNAIL_SIDE // 2:  # 32x32 CIFAR samples: blow up, pixels kept sharp
        factor = THUMBNAIL_SIDE // max(thumbnail.size)
        thumbnail = thumbnail.resize((thumbnail.width * factor, thumbnail.height * factor), Image.NEAREST)
    return ImageChoice(image=image, digest=image_digest(image), label=label, source=source, thumbnail=thumbnail)


def _sample_names() -> list[str]:
    return [path.name for path in images.list_samples()]


def _set(token: tuple[str, ...], load: Callable[[], ImageChoice]) -> None:
    """Decode a new pick (only when ``token`` changed); an ImageError becomes one stored sentence."""
    if st.session_state.get(TOKEN_KEY) == token:
        return
    st.session_state[TOKEN_KEY] = token
    try:
        choice = load()
    except images.ImageError as exc:
        st.session_state[STATE_KEY] = None
        st.session_state[ERROR_KEY] = str(exc)
        return
    st.session_state[STATE_KEY] = choice
    st.session_state[ERROR_KEY] = None


def _pick_sample() -> None:
    names = _sample_names()
    if not names:
        st.warning("No sample images are installed; upload one instead.")
        return
    if st.session_state.get(SAMPLE_KEY) not in names:
        last = st.session_state.get(LAST_SAMPLE_KEY)
        st.session_state[SAMPLE_KEY] = last if last in names else DEFAULT_SAMPLE if DEFAULT_SAMPLE in names else names[0]
    name = st.selectbox("Sample image", names, key=SAMPLE_KEY,
                        format_func=lambda n: images.sample_caption(n))
    st.session_state[LAST_SAMPLE_KEY] = name
    path = images.SAMPLES_DIR / name
    _set(("sample", name), lambda: make_choice(images.load_image(path), images.sample_caption(path), "sample"))


def _pick_file(kind: str, uploaded: UploadedFile | None) -> None:
    if uploaded is None:
        return  # nothing new: the previous choice stays (also across pages)
    name = str(getattr(uploaded, "name", kind))
    file_id = str(getattr(uploaded, "file_id", name))
    label = "camera snapshot" if kind == "camera" else f"uploaded file {Path(name).name}"
    _set((kind, file_id), lambda: make_choice(images.load_image(uploaded), label, kind))


def image_picker() -> ImageChoice | None:
    """Render the picker in the sidebar and return the current image (None when unusable)."""
    if SOURCE_KEY not in st.session_state:
        st.session_state[SOURCE_KEY] = SOURCES[0]
    with st.sidebar:
        st.subheader("Image")
        source = st.radio("Image source", SOURCES, key=SOURCE_KEY, horizontal=True)
        if source == "Sample":
            _pick_sample()
        elif source == "Upload":
            _pick_file("upload", st.file_uploader(
                f"Upload an image ({images.ACCEPTED_TEXT})", type=list(UPLOAD_TYPES), key=UPLOAD_KEY))
        else:
            # Only rendered on request: the browser asks for camera permission when this appears.
            _pick_file("camera", st.camera_input("Take a picture", key=CAMERA_KEY))
        if error := st.session_state.get(ERROR_KEY):
            st.error(error)
        choice = current_image()
        if choice is not None:
            size = f"{choice.size[0]}x{choice.size[1]}"
            st.image(choice.thumbnail, caption=choice.label if size in choice.label else f"{choice.label} ({size})")
    return choice


def current_image() -> ImageChoice | None:
    """The image chosen in the sidebar, or None (nothing chosen yet, or the upload was unusable)."""
    return st.session_state.get(STATE_KEY)


def require_image() -> ImageChoice:
    """The current image; otherwise a one-line hint and the page stops here."""
    choice = current_image()
    if choice is None:
        st.info("Choose a sample, upload an image or take a picture in the sidebar to begin.")
        st.stop()
    return choice

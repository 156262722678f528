"""Opening images: files, members of WebDataset shards, and a user's query image.

Any image PIL reads is opened fully decoded as RGB (16-bit and float greyscale rescaled, palette
transparency handled); a broken one raises ``ImageProblem`` whose message is the reason recorded
in ``skipped.jsonl``.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from engine import files
from engine.errors import ImageProblem, InputError

TAR_SEPARATOR = "::"  # SHARD.tar::MEMBER names an image inside a WebDataset shard
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")

# Per process (each DataLoader worker has its own): tar path -> {member: (offset, size)}.
_TAR_INDEX: dict[str, dict[str, tuple[int, int]]] = {}


def _tar_member_bytes(tar_path: str, member: str) -> bytes:
    index = _TAR_INDEX.get(tar_path)
    if index is None:
        try:
            with tarfile.open(tar_path) as tar:
                index = {i.name: (i.offset_data, i.size) for i in tar if i.isfile()}
        except (OSError, tarfile.TarError) as err:
            raise ImageProblem(f"cannot read shard {tar_path}: {err}") from err
        _TAR_INDEX[tar_path] = index
    if member not in index:
        raise ImageProblem(f"{member} is not in shard {tar_path}")
    offset, size = index[member]
    with open(tar_path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I", "F"):  # 16-bit / float greyscale
        pixels = np.asarray(img, dtype=np.float32)
        top = float(pixels.max()) or 1.0
        img = Image.fromarray((pixels * (255.0 / top)).clip(0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    return img.convert("RGB")


def open_image(ref: str | os.PathLike) -> Image.Image:
    """Opens an image (a path, or ``SHARD.tar::MEMBER``) fully decoded, as RGB.

    Raises:
        ImageProblem: missing, not an image, truncated, or too many pixels; the message says which.
    """
    ref = str(ref)
    try:
        if TAR_SEPARATOR in ref:
            tar_path, member = ref.split(TAR_SEPARATOR, 1)
            source: io.BytesIO | str = io.BytesIO(_tar_member_bytes(tar_path, member))
        else:
            if not os.path.isfile(ref):
                raise ImageProblem("missing: no file at this path")
            source = ref
        with Image.open(source) as img:
            img.load()  # decodes everything now: a truncated file fails here, not later
            return _to_rgb(img)
    except ImageProblem:
        raise
    except Image.DecompressionBombError as err:
        raise ImageProblem(f"too large: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        text = str(err)
        if "truncated" in text:
            raise ImageProblem(f"truncated: {text}") from err
        raise ImageProblem(f"unreadable: {type(err).__name__}: {text}") from err


def materialize(ref: str | os.PathLike, cache: Path) -> Path:
    """A file path for an image: the path itself, or a tar member extracted once under
    ``cache`` (for viewers that need a file, such as the dashboard and exports)."""
    ref = str(ref)
    if TAR_SEPARATOR not in ref:
        return Path(ref)
    tar_path, member = ref.split(TAR_SEPARATOR, 1)
    target = cache / Path(tar_path).stem / member
    if not target.is_file():
        files.write_bytes(target, _tar_member_bytes(tar_path, member))
    return target


# Largest upload the dashboard takes (Streamlit refuses larger files before they arrive).
MAX_UPLOAD_MB = 20
# Pixels above which an image is refused (decompression bombs): 40 megapixels.
MAX_PIXELS = 40_000_000


def open_query_image(
    source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Opens a user's image (a path or the bytes of a file) as RGB, checking it first.

    The pixel count is checked from the header, before anything is decoded (a decompression
    bomb costs nothing); the image is turned upright by its EXIF orientation; an animated image
    gives its first frame; 16-bit, CMYK and palette images are converted as ``open_image`` does.

    Raises:
        InputError: missing, empty or unreadable file, a truncated or corrupt image, or more
            than ``max_pixels`` pixels; the message says which.
    """
    name = "the uploaded file" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise InputError(f"image {name} does not exist or is not a file")
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as err:
        raise InputError(f"cannot read image {name}: {err.strerror}") from err
    if not raw:
        raise InputError(f"{name} is empty (0 bytes); expected a PNG, JPEG, WebP, ... file")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise InputError(
                    f"image {name} has {width}x{height} = {width * height:,} pixels, more than "
                    f"the limit of {max_pixels:,}; downscale it first"
                )
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except InputError:
        raise
    except Image.DecompressionBombError as err:  # PIL refuses it from the header, as we do
        raise InputError(
            f"image {name} has too many pixels to decode safely ({err}); downscale it first"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        text = str(err)
        what = (
            "is truncated (the end of the file is missing)"
            if "truncated" in text
            else "is not an image PIL can read"
        )
        raise InputError(
            f"{name} {what} ({type(err).__name__}: {text}); expected a complete PNG, JPEG, "
            "WebP, ... file"
        ) from err

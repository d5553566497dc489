"""Image loading with clear errors and documented handling of odd inputs.

- Files that are missing, folders, or not decodable raise `ImageError` naming the file.
- The EXIF orientation tag is applied (a phone photo stored sideways is fed upright), as every image viewer does.
- Any mode is converted to RGB; transparent images (RGBA, LA, P with transparency) are composited on white, so a
  transparent background does not turn black.
- Images whose shorter side is below `MIN_SIDE` (e.g. 1x1) are upscaled (nearest) to that side: every processor
  can then resize them, and Qwen2-VL's smart_resize, which rejects sides below 28 px, accepts them.
- Images whose longer side exceeds `MAX_SIDE` are downscaled (aspect kept) before the processor, bounding memory;
  every supported processor resizes far below that anyway. JPEGs are decoded at a reduced scale (libjpeg's
  draft mode); other formats are decoded once at full size and then reduced band by band, so the peak memory is
  the decoded image plus a small fraction of it (no full-size copy or mode conversion).
- Files above Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, 89.5 M pixels by default; Pillow
  itself only warns up to twice that) raise `ImageError`: a small compressed file cannot make vlmeff allocate
  gigabytes.
- Aspect ratios above `MAX_ASPECT` raise `ImageError` (Qwen2-VL refuses > 200; nothing useful survives resizing).
- Arrays: HxW or HxWxC (C in 1, 3, 4); uint8 as is, bool as black / white, other integers within 0..255, uint16
  HxW as 16-bit grayscale, floats finite within [0, 1]; anything else is an `ImageError` saying what is accepted.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MIN_SIDE = 28
MAX_SIDE = 4096
MAX_ASPECT = 200.0
_BAND_ROWS = 512  # rows per band when a decoded image is reduced (bounds the temporary copies)
_ORIENTATION = 0x0112  # EXIF tag
# EXIF orientation -> the transpose that shows the image upright (EXIF 2.3, tag 0x0112; 1 = already upright)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


class ImageError(ValueError):
    """An image that cannot be used, with the reason and its source."""


def load_image(source: str | os.PathLike | bytes | Image.Image | np.ndarray, name: str | None = None) -> Image.Image:
    """Open (if needed) and normalise an image: upright (EXIF), RGB, side lengths within [MIN_SIDE, MAX_SIDE].

    source: a file path, the encoded bytes of an image file, a PIL image or an array. name: how errors call the
    image (default: the path, ``<bytes>``, ``<image>`` or ``<array>``)."""
    if isinstance(source, (str, os.PathLike)):
        label = name or str(source)
        path = Path(source)
        if path.is_dir():
            raise ImageError(f"image path {label!r} is a folder, not an image file")
        if not path.is_file():
            raise ImageError(f"image file {label!r} does not exist")
        try:
            with open(path, "rb") as fh:
                image = _decode(fh, f"image file {label!r}")
        except PermissionError:
            raise ImageError(f"image file {label!r} cannot be read (permission denied)") from None
        return normalize_image(image, label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        return normalize_image(_decode(io.BytesIO(bytes(source)), f"image {label}"), label)
    if isinstance(source, np.ndarray):
        return normalize_image(_from_array(source, name or "<array>"), name or "<array>")
    if isinstance(source, Image.Image):
        return normalize_image(source, name or "<image>")
    raise ImageError(f"unsupported image type {type(source).__name__}: pass a path, bytes, a PIL image or an array")


def _decode(fh, what: str) -> Image.Image:
    """Decode an image file object under the pixel limit; big JPEGs at a reduced scale. Returns a loaded image that
    no longer needs `fh`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow warns from 1x to 2x its limit
            image = Image.open(fh)
            if max(image.size) > MAX_SIDE:
                image.draft(image.mode, _fit(image.size, MAX_SIDE))  # JPEG: libjpeg decodes at 1/2 .. 1/8
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{what} is too large to decode safely ({e}); shrink it, or raise "
                         "PIL.Image.MAX_IMAGE_PIXELS if you trust it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{what} could not be decoded ({type(e).__name__}: {e})") from None
    return image


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    """A PIL image from an array, with vlmeff's own errors for shapes, dtypes and values PIL would reject raw."""
    accepted = "HxW or HxWxC with C in 1, 3, 4"
    if array.ndim not in (2, 3) or array.size == 0 or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        hint = (" (channels first? use array.transpose(1, 2, 0))"
                if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4) else "")
        raise ImageError(f"image array {name} of shape {array.shape}: expected {accepted}{hint}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        pass
    elif kind == "b":
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(array)  # mode I;16
    elif kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ImageError(f"image array {name} of dtype {array.dtype} has values {low}..{high}: integer images "
                             "must lie in 0..255 (uint16 HxW is read as 16-bit grayscale)")
        array = array.astype(np.uint8)
    elif kind == "f":
        if not np.isfinite(array).all():
            raise ImageError(f"image array {name} of dtype {array.dtype} holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ImageError(f"image array {name} of dtype {array.dtype} has values {low:g}..{high:g}: float images "
                             "must lie in [0, 1] (or pass uint8 values 0..255)")
        array = np.round(array * 255.0).astype(np.uint8)
    else:
        raise ImageError(f"image array {name} of dtype {array.dtype}: expected uint8, bool, integers 0..255, uint16 "
                         "grayscale or floats in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(array))


def normalize_image(image: Image.Image, name: str = "<image>") -> Image.Image:
    """RGB, upright, sides within [MIN_SIDE, MAX_SIDE]; a big image is reduced before any mode conversion."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image {name} has an empty size {width}x{height}")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageError(f"image {name} is {width}x{height}: aspect ratio above {MAX_ASPECT:.0f} is not supported")
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
        if max(width, height) > MAX_SIDE:
            image = _shrink(image, MAX_SIDE)  # RGB from here on
        else:
            image = _to_rgb(image)
        if orientation in _UPRIGHT:  # transposed after the reduction: the cheap way round
            image = image.transpose(_UPRIGHT[orientation])
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a lazily opened image that fails to decode
        raise ImageError(f"image {name} could not be decoded ({type(e).__name__}: {e})") from None
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        scale = MIN_SIDE / min(width, height)
        image = image.resize((max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale))),
                             Image.Resampling.NEAREST)
    return image


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    """`size` scaled so that its longer side is `side` (aspect kept, each side at least 1)."""
    scale = side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _shrink(image: Image.Image, side: int) -> Image.Image:
    """RGB `image` with its longer side reduced to `side`: an integer box reduction (band by band, each band
    converted to RGB on its own, so no full-size copy in another mode is made), then one bicubic resize."""
    image.load()
    width, height = image.size
    target = _fit(image.size, side)
    factor = max(1, int(min(width / target[0], height / target[1])))
    if image.mode == "RGB":
        return (image.reduce(factor) if factor > 1 else image).resize(target, Image.Resampling.BICUBIC)
    extrema = _gray16_extrema(image)
    band = max(factor, _BAND_ROWS // factor * factor)  # a multiple of the factor: the bands reduce exactly
    out = Image.new("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    for top in range(0, height, band):
        part = _to_rgb(image.crop((0, top, width, min(height, top + band))), extrema)
        out.paste(part.reduce(factor) if factor > 1 else part, (0, top // factor))
    return out.resize(target, Image.Resampling.BICUBIC)


def _gray16_extrema(image: Image.Image) -> tuple[float, float] | None:
    """(min, max) of a 16/32-bit grayscale image (its 8-bit rescale must be the same in every band), else None."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        low, high = image.getextrema()
        return float(low), float(high)
    return None


def _to_rgb(image: Image.Image, extrema: tuple[float, float] | None = None) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: rescale min..max to 8 bit
        low, high = extrema if extrema is not None else _gray16_extrema(image)
        array = np.asarray(image, dtype=np.float64)
        span = high - low
        array = (array - low) / span * 255 if span > 0 else np.zeros_like(array)
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")

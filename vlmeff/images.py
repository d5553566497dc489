"""Image loading with clear errors and documented handling of odd inputs.

- Files that are missing or not decodable raise `ImageError` naming the file.
- Any mode is converted to RGB; transparent images (RGBA, LA, P with transparency) are composited on white, so a
  transparent background does not turn black.
- Images whose shorter side is below `MIN_SIDE` (e.g. 1x1) are upscaled (nearest) to that side: every processor
  can then resize them, and Qwen2-VL's smart_resize, which rejects sides below 28 px, accepts them.
- Images whose longer side exceeds `MAX_SIDE` are downscaled (aspect kept) before the processor, bounding memory;
  every supported processor resizes far below that anyway.
- Aspect ratios above `MAX_ASPECT` raise `ImageError` (Qwen2-VL refuses > 200; nothing useful survives resizing).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MIN_SIDE = 28
MAX_SIDE = 4096
MAX_ASPECT = 200.0


class ImageError(ValueError):
    """An image that cannot be used, with the reason and its source."""


def load_image(source: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """Open (if needed) and normalise an image: RGB, side lengths within [MIN_SIDE, MAX_SIDE]."""
    name = "<array>"
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image file {name!r} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ImageError(f"image file {name!r} could not be decoded ({type(e).__name__}: {e})") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"image file {name!r} is too large to decode safely: {e}") from None
    elif isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or source.size == 0:
            raise ImageError(f"image array of shape {source.shape}: expected HxW or HxWxC with C in 1, 3, 4")
        image = Image.fromarray(source.squeeze(-1) if source.ndim == 3 and source.shape[-1] == 1 else source)
    elif isinstance(source, Image.Image):
        image = source
    else:
        raise ImageError(f"unsupported image type {type(source).__name__}: pass a path, a PIL image or an array")
    return normalize_image(image, name)


def normalize_image(image: Image.Image, name: str = "<image>") -> Image.Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image {name} has an empty size {width}x{height}")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageError(f"image {name} is {width}x{height}: aspect ratio above {MAX_ASPECT:.0f} is not supported")
    image = _to_rgb(image)
    if min(width, height) < MIN_SIDE:
        scale = MIN_SIDE / min(width, height)
        image = image.resize((max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale))),
                             Image.Resampling.NEAREST)
    elif max(width, height) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: rescale to 8 bit
        array = np.asarray(image, dtype=np.float64)
        span = array.max() - array.min()
        array = (array - array.min()) / span * 255 if span > 0 else np.zeros_like(array)
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")

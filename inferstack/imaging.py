"""Turn uploaded bytes into the model's input pixels (uint8 RGB, model size), or a clear error."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats whose decoders are common and well fuzzed; anything else is refused.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
# We enforce our own pixel limit before decoding; Pillow's global one would only warn.
Image.MAX_IMAGE_PIXELS = None


class BadImage(ValueError):
    """The upload is not an image we can classify; the message tells the user why."""


class TooManyPixels(BadImage):
    """The image's header announces more pixels than we are willing to decode."""


def decode_image(data: bytes, size: tuple[int, int], max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode, orient, convert to RGB and resize to size=(height, width). Returns uint8 (h, w, 3)."""
    if not data:
        raise BadImage("The uploaded file is empty; send a JPEG, PNG, GIF, BMP, TIFF or WebP image.")
    height, width = size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise BadImage(
            "The upload is not a supported image; send a JPEG, PNG, GIF, BMP, TIFF or WebP file."
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooManyPixels(f"The image has too many pixels; the limit is {max_pixels} pixels.") from None
    except Exception as exc:  # Pillow raises many types on corrupt headers
        raise BadImage(f"The image could not be read ({_short(exc)}); check that the file is not damaged.") from None

    if im.width * im.height > max_pixels:
        raise TooManyPixels(
            f"The image is {im.width}x{im.height} = {im.width * im.height} pixels; "
            f"the limit is {max_pixels} pixels. Resize it and retry."
        )
    if im.width < 1 or im.height < 1:
        raise BadImage("The image has no pixels.")
    try:
        if im.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the photo is much larger than needed.
            im.draft("RGB", (width, height))
        im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
        if im.size != (width, height):
            im = im.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(im, dtype=np.uint8)
    except BadImage:
        raise
    except Exception as exc:  # truncated data, bad Huffman tables, broken palettes...
        raise BadImage(f"The image data is damaged or incomplete ({_short(exc)}).") from None
    return np.ascontiguousarray(pixels.reshape(height, width, 3))


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 16-bit range -> 8-bit
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        # Transparent areas become white, as a browser would show them on a page.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")
    return im


def _short(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:120]

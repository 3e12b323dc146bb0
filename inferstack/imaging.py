"""Turn uploaded bytes into the model's input pixels (uint8 RGB, model size), or a clear error."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # libspng decodes PNG in about 55% of Pillow's time; without its wheel Pillow decodes every PNG
    import pyspng
except ImportError:  # pragma: no cover - platforms without a pyspng wheel
    pyspng = None

# Formats whose decoders are common and well fuzzed; anything else is refused.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
# We enforce our own pixel limit before decoding; Pillow's global one would only warn.
Image.MAX_IMAGE_PIXELS = None


class BadImage(ValueError):
    """The upload is not an image we can classify; the message tells the user why."""


class TooManyPixels(BadImage):
    """The image's header announces more pixels than we are willing to decode."""


class TooLargeToDecode(TooManyPixels):
    """Decoding the image would take more memory than one decode may use."""


# Bytes per pixel Pillow holds in memory for each mode (multi-band modes are stored 4 bytes wide).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


_QUARTER_TURNS = frozenset({Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                            Image.Transpose.ROTATE_90})


# Modes Image.reduce refuses, or would average wrongly (palette indices).
_NO_REDUCE = frozenset({"1", "P", "PA", "I;16", "I;16B", "I;16L", "I;16N"})


def decoded_bytes(im: Image.Image) -> int:
    """Memory the decoder will allocate for the (first frame of the) image, from its header."""
    return im.width * im.height * _MODE_BYTES.get(im.mode, 4)


def decode_image(
    data: bytes, size: tuple[int, int], max_pixels: int = 50_000_000, max_bytes: int = 128 * 1024 * 1024,
    *, fast_png: bool = True,
) -> np.ndarray:
    """Decode, orient, convert to RGB and resize to size=(height, width). Returns uint8 (h, w, 3).

    Memory is bounded by design: the header is checked against max_pixels and max_bytes before
    anything is decoded, JPEGs are decoded at reduced scale (down to 1.5x the model's size), and
    every conversion runs on an image already shrunk to about twice the model's size. Multi-frame
    files: first frame only.
    Plain 8-bit PNGs are decoded by libspng (pixels identical to Pillow's), the rest by Pillow;
    fast_png=False: Pillow decodes every PNG (the reference the tests hold libspng to).
    """
    if not data:
        raise BadImage("The uploaded file is empty; send a JPEG, PNG, GIF, BMP, TIFF or WebP image.")
    height, width = size
    im = _open_checked(data, max_pixels)
    try:
        pixels = _decode_resized(im, data if fast_png else None, width, height, max_bytes)
    except BadImage:
        raise
    except Exception as exc:  # truncated data, bad Huffman tables, broken palettes...
        raise BadImage(f"The image data is damaged or incomplete ({_short(exc)}).") from None
    return np.ascontiguousarray(pixels.reshape(height, width, 3))


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header, read and checked against max_pixels; nothing decoded yet."""
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
    return im


def _decode_resized(im: Image.Image, data: bytes | None, width: int, height: int, max_bytes: int) -> np.ndarray:
    """Decode within max_bytes, shrink, convert to RGB, resize and orient: uint8 (height, width, 3).

    data: the file's bytes, for libspng to decode a plain PNG; None: Pillow decodes.
    """
    if im.format == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale, down to 1.5x the model's size. At 2x (before)
        # the mixed-photo bench set took 5.7 ms a JPEG, at 1.5x 4.8; 1x took 3.5 but its pixels
        # left a full decode and resize by up to 4.2 levels on average (1.5x: 2.3, 2x: 1.8).
        im.draft(im.mode if im.mode in ("L", "RGB") else None, (width * 3 // 2, height * 3 // 2))
    need = decoded_bytes(im)
    if need > max_bytes:
        raise TooLargeToDecode(
            f"The image is {im.width}x{im.height} in mode {im.mode}: decoding it would take "
            f"{need // 2**20} MiB, over the limit of {max_bytes // 2**20} MiB. Send a smaller image "
            "(fewer pixels or 8 bits per channel)."
        )
    im, orientation = _loaded(im, data, max_bytes - need)
    im = _to_rgb(_shrink(im, 2 * max(width, height)))
    method = _ORIENTATION.get(orientation or 0)  # 0: no tag
    # Resize, then orient the small image (a quarter turn swaps the sides to resize to).
    target = (height, width) if method in _QUARTER_TURNS else (width, height)
    if im.size != target:
        im = im.resize(target, Image.Resampling.BILINEAR)
    if method is not None:
        im = im.transpose(method)
    return np.asarray(im, dtype=np.uint8)


def _loaded(im: Image.Image, data: bytes | None, budget: int) -> tuple[Image.Image, int | None]:
    """The decoded image and its EXIF orientation tag: libspng for a plain PNG when data is given
    and its copies fit in budget more bytes, Pillow's load() for everything else."""
    fast = _spng_image(im, data, budget) if data is not None else None
    if fast is None:
        im.load()
        return im, im.getexif().get(0x0112)
    # The header chunks Pillow read are all the metadata there is (_plain_png_mode), so the
    # orientation comes from them without the PNG plugin's getexif(), which would decode.
    return fast, Image.Image.getexif(im).get(0x0112)


def _spng_image(im: Image.Image, data: bytes, budget: int) -> Image.Image | None:
    """The PNG's pixels decoded by libspng, as the image Pillow's load() would give; None where
    that equality is not proven (palette, 16-bit, odd layouts), libspng refuses the file, or
    its extra copy would not fit in budget bytes: then Pillow decodes, exactly as before.
    """
    if pyspng is None or im.format != "PNG":
        return None
    mode = _plain_png_mode(data)
    if mode is None or mode != im.mode:
        return None
    # pyspng's copy of the file, and its array (one byte per band) beside Pillow's copy of that.
    if len(data) + im.width * im.height * len(mode) > budget:
        return None
    try:
        # No transparency or gamma flags: like Pillow, libspng then returns the stored samples.
        arr = pyspng.load(data, mode)
    except Exception:  # libspng is stricter (adler32, trailing data...): Pillow decides
        return None
    if arr.shape[:2] != (im.height, im.width):
        return None
    return Image.fromarray(arr, mode)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 8-bit colour types whose samples Pillow and libspng both keep as stored -> Pillow's mode. Not
# grey+alpha (4): pyspng's only output for it, libspng's GA8, is refused for that colour type.
_PLAIN_PNG_MODES = {0: "L", 2: "RGB", 6: "RGBA"}
# Chunks that make Pillow decode something other than one plain image (APNG frames, regions).
_ANIMATION_CHUNKS = frozenset({b"acTL", b"fcTL", b"fdAT"})


def _plain_png_mode(data: bytes) -> str | None:
    """The Pillow mode of a PNG laid out as IHDR, header chunks, IDAT..., IEND, every chunk
    whole, 8 bits per sample, no palette, no animation; None for any other file.

    Nothing may follow the image data but IEND: Pillow reads trailing chunks only while
    loading (text, eXIf, and ones it may reject), so such files stay with Pillow.
    """
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    bit_depth, colour_type = data[24], data[25]
    mode = _PLAIN_PNG_MODES.get(colour_type) if bit_depth == 8 else None
    pos, in_image_data = 8, False
    while mode is not None and pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if pos + 12 + length > len(data):
            return None  # truncated
        if kind == b"IEND":
            return mode if in_image_data else None
        if kind == b"IDAT":
            in_image_data = True
        elif in_image_data or kind in _ANIMATION_CHUNKS or (kind == b"IHDR" and pos != 8):
            return None
        pos += 12 + length
    return None


def _shrink(im: Image.Image, side: int) -> Image.Image:
    """Average down to about side x side before any conversion, so no full-size copy is made."""
    factor = min(im.width // side, im.height // side)
    if factor >= 2 and im.mode in ("LA", "RGBA"):
        # Pillow's reduce/resize first make a full-size premultiplied copy of these modes; one
        # band at a time costs a quarter of that.
        return Image.merge(im.mode, [im.getchannel(band).reduce(factor) for band in im.getbands()])
    if factor >= 2 and im.mode not in _NO_REDUCE:
        return im.reduce(factor)  # block averaging straight into a small image
    if im.width * im.height <= 2 * side * side or im.mode == "RGB":
        # Already small, or RGB (no conversion follows): one antialiased resize to the model's
        # size costs less than two, and is the reference result (measured: 451x300 2.0 vs 3.3 ms;
        # 1600x1200 JPEG, decoded at 800x600, 8.4 vs 10.7 ms, 0.4 vs 1.1 levels from a full decode).
        return im
    target = (min(im.width, side), min(im.height, side))
    # Palette indices cannot be averaged: sample them (Pillow does the same for "1" and "P").
    resample = Image.Resampling.NEAREST if im.mode in ("1", "P", "PA") else Image.Resampling.BOX
    return im.resize(target, resample)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB; called on an already shrunk image."""
    mode = im.mode
    if mode.startswith("I;16"):
        arr = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)  # 16-bit range -> 8-bit
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        if mode == "I" and arr.max(initial=0) > 255:
            arr = arr / 257.0
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

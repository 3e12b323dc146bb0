"""Decoding uploads the way the web tier does: orientation, colour modes, formats, bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from inferstack.imaging import BadImage, TooManyPixels, decode_image
from tests.helpers import encode, halves


def test_real_photo_is_resized_to_model_input() -> None:
    import skimage.data

    data = encode(Image.fromarray(skimage.data.chelsea()), "JPEG")
    out = decode_image(data, (224, 224))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert 40 < out.mean() < 220  # a photo, not a blank


@pytest.mark.parametrize("side", [700, 1600, 4000])
def test_a_large_jpeg_decoded_at_reduced_scale_matches_a_full_decode(side: int) -> None:
    # libjpeg's scaled decode stops at 1.5x the model's size: what the model sees stays what a
    # full-size decode and an antialiased resize give (a draft down to 1x: 2.4 levels at 700 px).
    import skimage.data

    photo = Image.fromarray(skimage.data.astronaut()).resize((side, side * 3 // 4), Image.Resampling.BICUBIC)
    reference = np.asarray(photo.resize((224, 224), Image.Resampling.BILINEAR), dtype=np.int16)
    out = decode_image(encode(photo, "JPEG", quality=95), (224, 224)).astype(np.int16)
    assert np.abs(out - reference).mean() < 2.0


def test_exif_orientation_is_applied() -> None:
    im = halves()
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held rotated: display rotated 90 degrees clockwise
    out = decode_image(encode(im, "JPEG", exif=exif, quality=95), (64, 64))
    # After rotating clockwise, red (was left) is on top, blue at the bottom.
    assert out[4, 32, 0] > 200 and out[4, 32, 2] < 60
    assert out[60, 32, 2] > 200 and out[60, 32, 0] < 60


def test_without_exif_left_stays_left() -> None:
    out = decode_image(encode(halves(), "PNG"), (64, 64))
    assert tuple(out[32, 4]) == (255, 0, 0) and tuple(out[32, 60]) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "P", "YCbCr"])
def test_colour_modes_become_rgb(mode: str) -> None:
    im = halves().convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "YCbCr", "L") else "PNG" if mode != "1" else "BMP"
    out = decode_image(encode(im, fmt), (32, 32))
    assert out.shape == (32, 32, 3)
    if mode in ("L", "1"):
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    if mode in ("CMYK", "P"):
        assert out[16, 2, 0] > 180 and out[16, 2, 2] < 90  # still red on the left


def test_transparent_areas_become_white() -> None:
    arr = np.zeros((16, 16, 4), np.uint8)
    arr[:, :8] = (0, 128, 0, 255)  # opaque green
    arr[:, 8:] = (0, 0, 0, 0)  # fully transparent
    out = decode_image(encode(Image.fromarray(arr, "RGBA"), "PNG"), (16, 16))
    assert tuple(out[8, 2]) == (0, 128, 0)
    assert tuple(out[8, 12]) == (255, 255, 255)


def test_palette_with_transparency() -> None:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    im.paste(1, (0, 0, 4, 8))
    data = encode(im, "PNG", transparency=0)
    out = decode_image(data, (8, 8))
    assert tuple(out[4, 1]) == (200, 10, 10) and tuple(out[4, 6]) == (255, 255, 255)


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16)[None, :].repeat(8, axis=0)
    data = encode(Image.fromarray(ramp), "PNG")
    out = decode_image(data, (8, 64))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert 100 < out[0, 32, 0] < 160  # mid-grey, not saturated white


def test_animated_gif_uses_first_frame() -> None:
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    blue = Image.new("RGB", (16, 16), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_image(data, (16, 16))
    assert out[8, 8, 0] > 200 and out[8, 8, 2] < 50


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "GIF"])
def test_other_supported_formats(fmt: str) -> None:
    out = decode_image(encode(halves(), fmt), (32, 64))
    assert out.shape == (32, 64, 3)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "empty"),
        (b"hello, this is a text file\n" * 20, "not a supported image"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", "not a supported image"),
    ],
)
def test_not_images(data: bytes, words: str) -> None:
    with pytest.raises(BadImage, match=words):
        decode_image(data, (32, 32))


def test_unsupported_but_decodable_format_is_refused() -> None:
    with pytest.raises(BadImage, match="not a supported image"):
        decode_image(encode(halves(), "TGA"), (32, 32))


def test_truncated_jpeg() -> None:
    import skimage.data

    data = encode(Image.fromarray(skimage.data.coffee()), "JPEG")
    with pytest.raises(BadImage, match="damaged|incomplete|could not be read"):
        decode_image(data[: len(data) // 2], (224, 224))


def test_pixel_limit_checked_before_decoding() -> None:
    data = encode(Image.new("L", (4000, 3000)), "PNG")  # compresses to a few KB
    assert len(data) < 200_000
    with pytest.raises(TooManyPixels, match="12000000 pixels"):
        decode_image(data, (224, 224), max_pixels=10_000_000)

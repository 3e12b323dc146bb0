"""Decoding memory is bounded by the header check, for every path a hostile file can take."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from inferstack.imaging import TooLargeToDecode, decode_image, decoded_bytes
from tests.helpers import encode


def peak_rss_mib_of_decode(data: bytes) -> tuple[float, str]:
    """Decode in a fresh interpreter; the growth of its peak RSS during decode_image, in MiB."""
    code = textwrap.dedent(
        """
        import re, sys
        from inferstack.imaging import decode_image, BadImage

        def peak_kib():  # this process's own high-water mark (ru_maxrss would include the parent's)
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1))

        data = sys.stdin.buffer.read()
        before = peak_kib()
        try:
            out = "ok %r" % (decode_image(data, (224, 224)).shape,)
        except BadImage as exc:
            out = "refused %s" % exc
        print((peak_kib() - before) / 1024, out)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True, timeout=120)
    grown, outcome = proc.stdout.decode().strip().split(" ", 1)
    return float(grown), outcome


def test_16bit_bomb_decodes_within_its_own_size() -> None:
    # 7070x7070 16-bit grey, ~110 KB on the wire: 95 MiB of pixels, and no float64 copies of them.
    data = encode(Image.new("I;16", (7070, 7070), 1000), "PNG", compress_level=9)
    assert len(data) < 200_000
    grown, outcome = peak_rss_mib_of_decode(data)
    assert outcome.startswith("ok"), outcome
    assert grown < 95 * 1.3, f"decode grew RSS by {grown:.0f} MiB"


def test_alpha_image_converts_without_full_size_copies() -> None:
    # 4000x4000 RGBA: 61 MiB decoded; shrinking and compositing on white make no full-size copy.
    data = encode(Image.new("RGBA", (4000, 4000), (0, 128, 0, 128)), "PNG", compress_level=1)
    grown, outcome = peak_rss_mib_of_decode(data)
    assert outcome.startswith("ok"), outcome
    assert grown < 61 * 1.5, f"decode grew RSS by {grown:.0f} MiB"  # one band at a time: +25%


def test_over_budget_is_refused_from_the_header() -> None:
    data = encode(Image.new("RGBA", (7070, 7070), (1, 2, 3, 255)), "PNG", compress_level=9)
    grown, outcome = peak_rss_mib_of_decode(data)
    assert outcome.startswith("refused") and "MiB" in outcome, outcome
    assert grown < 20, f"refusing grew RSS by {grown:.0f} MiB"
    with pytest.raises(TooLargeToDecode, match="over the limit of 128 MiB"):
        decode_image(data, (224, 224))


def test_large_jpeg_is_decoded_at_reduced_scale_within_budget() -> None:
    # 6000x6000 RGB is 137 MiB at full size, over an 64 MiB budget; libjpeg's 1/8 scale fits.
    arr = np.zeros((6000, 6000, 3), np.uint8)
    arr[:, 3000:] = (0, 0, 255)
    data = encode(Image.fromarray(arr), "JPEG", quality=80)
    out = decode_image(data, (224, 224), max_bytes=64 * 2**20)
    assert out.shape == (224, 224, 3)
    assert out[112, 10, 2] < 40 and out[112, 214, 2] > 200


def test_16bit_levels_map_to_8bit() -> None:
    arr = np.array([[0, 32896, 65535, 65535]], np.uint16).repeat(4, axis=0)
    out = decode_image(encode(Image.fromarray(arr), "PNG"), (4, 4))
    assert out[0, 0, 0] == 0 and 125 <= out[0, 1, 0] <= 130 and out[0, 3, 0] == 255


def test_exif_orientation_after_shrinking_a_large_photo() -> None:
    arr = np.zeros((1000, 2000, 3), np.uint8)
    arr[:, :1000] = (255, 0, 0)
    arr[:, 1000:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: red (left) ends on top
    out = decode_image(encode(Image.fromarray(arr), "JPEG", exif=exif, quality=95), (64, 64))
    assert out[4, 32, 0] > 200 and out[4, 32, 2] < 60
    assert out[60, 32, 2] > 200 and out[60, 32, 0] < 60


def test_multi_frame_gif_uses_the_first_frame_only() -> None:
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    blue = Image.new("RGB", (64, 64), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue] * 3)
    out = decode_image(data, (32, 32))
    assert out[16, 16, 0] > 200 and out[16, 16, 2] < 60


def test_decoded_bytes_follow_pillow_storage() -> None:
    assert decoded_bytes(Image.new("L", (10, 10))) == 100
    assert decoded_bytes(Image.new("I;16", (10, 10))) == 200
    assert decoded_bytes(Image.new("RGB", (10, 10))) == 400  # Pillow stores RGB 4 bytes wide

"""PNG decoding: libspng's fast path gives exactly Pillow's pixels, and what it cannot prove equal
(palette, 16-bit, trailing chunks, animation, damaged files) stays with Pillow, message and all."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterable

import numpy as np
import pyspng  # noqa: F401 - installed with the package (pyproject): its absence must fail, not skip
import pytest
import skimage.data
from PIL import Image, PngImagePlugin

from inferstack import imaging
from inferstack.imaging import BadImage, TooLargeToDecode, decode_image
from tests.helpers import encode, halves

MAX_PIXELS = 50_000_000
MAX_BYTES = 128 * 2**20
SIZE = (224, 224)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Adam7 passes: (x start, y start, x step, y step).
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type


# --- building PNG files ----------------------------------------------------------------------


def split_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks as (type, body), CRCs dropped."""
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def join_chunks(chunks: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A PNG file from (type, body) chunks, CRCs computed."""
    out = [PNG_SIGNATURE]
    for kind, body in chunks:
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(out)


def raw_png(arr: np.ndarray, interlace: bool = False) -> bytes:
    """A PNG written row by row (filter 0), 16-bit for uint16 arrays, Adam7 when interlace: Pillow
    writes neither interlaced nor 16-bit colour files."""
    samples = arr if arr.ndim == 3 else arr[..., None]
    height, width, channels = samples.shape
    depth = 16 if samples.dtype == np.uint16 else 8
    samples = samples.astype(">u2") if depth == 16 else samples
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    raw = b"".join(
        b"".join(b"\0" + row.tobytes() for row in samples[y0::dy, x0::dx])
        for x0, y0, dx, dy in passes
        if samples[y0::dy, x0::dx].size
    )
    ihdr = struct.pack(">IIBBBBB", width, height, depth, COLOUR_TYPES[channels], 0, 0, int(interlace))
    return join_chunks([(b"IHDR", ihdr), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")])


def move_after_image_data(data: bytes, kind: bytes) -> bytes:
    """The same PNG with its `kind` chunk moved from the header to just before IEND."""
    chunks = split_chunks(data)
    moved = [c for c in chunks if c[0] == kind]
    assert moved, f"no {kind!r} chunk to move"
    rest = [c for c in chunks if c[0] != kind]
    return join_chunks(rest[:-1] + moved + rest[-1:])


def photo(name: str = "chelsea") -> np.ndarray:
    return getattr(skimage.data, name)()


def with_alpha(rgb_or_gray: np.ndarray) -> np.ndarray:
    """The image plus an alpha ramp from transparent (left) to opaque (right)."""
    h, w = rgb_or_gray.shape[:2]
    alpha = np.linspace(0, 255, w).astype(np.uint8)[None, :].repeat(h, axis=0)
    base = rgb_or_gray if rgb_or_gray.ndim == 3 else rgb_or_gray[..., None]
    return np.concatenate([base, alpha[..., None]], axis=2)


def rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return exif


# --- the two paths ---------------------------------------------------------------------------


@pytest.fixture
def spng_used(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per PNG that decode_image offered to libspng: True where libspng decoded it."""
    calls: list[bool] = []
    real = imaging._spng_image

    def spy(*args: object) -> Image.Image | None:
        out = real(*args)  # type: ignore[arg-type]
        calls.append(out is not None)
        return out

    monkeypatch.setattr(imaging, "_spng_image", spy)
    return calls


def pillow_only(data: bytes, size: tuple[int, int] = SIZE, max_bytes: int = MAX_BYTES) -> np.ndarray:
    return decode_image(data, size, MAX_PIXELS, max_bytes, fast_png=False)


def outcome(decode: Callable[[], np.ndarray]) -> np.ndarray | str:
    """The pixels, or the BadImage's class and message."""
    try:
        return decode()
    except BadImage as exc:
        return f"{type(exc).__name__}: {exc}"


def assert_same(data: bytes, size: tuple[int, int] = SIZE) -> np.ndarray:
    fast = decode_image(data, size, MAX_PIXELS, MAX_BYTES)
    reference = pillow_only(data, size)
    assert fast.shape == (*size, 3) and fast.dtype == np.uint8
    assert np.array_equal(fast, reference), f"differs in {np.count_nonzero(fast != reference)} samples"
    return fast


# --- the matrix ------------------------------------------------------------------------------

SPNG_KINDS: dict[str, Callable[[], bytes]] = {
    "L": lambda: encode(photo("camera"), "PNG"),
    "RGB": lambda: encode(photo(), "PNG"),
    "RGBA": lambda: encode(with_alpha(photo()), "PNG"),
    "RGB stored, no compression": lambda: encode(photo(), "PNG", compress_level=0),
    "L interlaced": lambda: raw_png(photo("camera"), interlace=True),
    "RGB interlaced": lambda: raw_png(photo(), interlace=True),
    "RGBA interlaced": lambda: raw_png(with_alpha(photo()), interlace=True),
    "RGB odd size interlaced": lambda: raw_png(photo()[:13, :11], interlace=True),
    # tRNS on 8-bit grey and RGB: Pillow keeps the mode (no alpha), libspng is not asked to apply it.
    "L with tRNS": lambda: encode(photo("camera"), "PNG", transparency=int(photo("camera")[100, 100])),
    "RGB with tRNS": lambda: encode(photo(), "PNG", transparency=tuple(int(v) for v in photo()[50, 50])),
    "RGB large, shrunk": lambda: encode(Image.fromarray(photo("astronaut")).resize((1400, 1400)), "PNG",
                                        compress_level=1),
    "RGBA large, shrunk per band": lambda: encode(Image.fromarray(with_alpha(photo("astronaut"))).resize((1000, 1000)),
                                                  "PNG", compress_level=1),
    "L large, shrunk": lambda: encode(Image.fromarray(photo("camera")).resize((1500, 1100)), "PNG", compress_level=1),
    "RGB with eXIf orientation": lambda: encode(photo(), "PNG", exif=rotated_exif()),
    "RGB after IEND garbage": lambda: encode(photo(), "PNG") + b"trailing bytes",
}

PILLOW_KINDS: dict[str, Callable[[], bytes]] = {
    "LA": lambda: encode(Image.fromarray(with_alpha(photo("camera")), "LA"), "PNG"),
    "LA interlaced": lambda: raw_png(with_alpha(photo("camera")), interlace=True),
    "P": lambda: encode(Image.fromarray(photo()).convert("P"), "PNG"),
    "P with transparency": lambda: encode(Image.fromarray(photo()).convert("P"), "PNG", transparency=3),
    "1-bit": lambda: encode(Image.fromarray(photo("camera")).convert("1"), "PNG"),
    "16-bit grey": lambda: encode(Image.fromarray(photo("camera").astype(np.uint16) * 257 + 3), "PNG"),
    "16-bit RGB": lambda: raw_png(photo().astype(np.uint16) * 257 + 7),
    "16-bit RGBA interlaced": lambda: raw_png(with_alpha(photo()).astype(np.uint16) * 255, interlace=True),
    "text after the image data": lambda: move_after_image_data(
        encode(photo(), "PNG", pnginfo=_text_info()), b"tEXt"),
    "eXIf after the image data": lambda: move_after_image_data(encode(photo(), "PNG", exif=rotated_exif()),
                                                               b"eXIf"),
    "APNG": lambda: encode(Image.fromarray(photo()), "PNG", save_all=True,
                           append_images=[Image.new("RGB", (451, 300), (0, 0, 255))]),
}


def _text_info() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "written after the pixels")
    return info


@pytest.mark.parametrize("kind", SPNG_KINDS)
def test_libspng_decodes_plain_8_bit_pngs_to_pillows_pixels(kind: str, spng_used: list[bool]) -> None:
    assert_same(SPNG_KINDS[kind]())
    assert spng_used == [True]


@pytest.mark.parametrize("kind", PILLOW_KINDS)
def test_pillow_decodes_what_libspng_cannot_match(kind: str, spng_used: list[bool]) -> None:
    assert_same(PILLOW_KINDS[kind]())
    assert spng_used == [False]


def test_interlaced_files_hold_the_same_image() -> None:
    """The test's own Adam7 writer is right: Pillow reads the same pixels either way."""
    for arr in (photo("camera"), with_alpha(photo())):
        assert np.array_equal(pillow_only(raw_png(arr, interlace=True)), pillow_only(raw_png(arr)))


def test_transparent_left_edge_becomes_white_on_the_fast_path(spng_used: list[bool]) -> None:
    out = decode_image(encode(with_alpha(photo()), "PNG"), SIZE)
    assert spng_used == [True]
    assert out[:, 0].min() >= 250  # alpha 0 at the left edge: white, as Pillow composites it
    assert out[:, -1].std() > 10  # opaque right edge: the photo


@pytest.mark.parametrize("where", ["header", "after the image data"])
def test_png_exif_orientation_is_applied(where: str, spng_used: list[bool]) -> None:
    data = encode(halves(), "PNG", exif=rotated_exif())
    if where != "header":
        data = move_after_image_data(data, b"eXIf")
    out = decode_image(data, (64, 64))
    # After rotating clockwise, red (was left) is on top, blue at the bottom.
    assert tuple(out[4, 32]) == (255, 0, 0) and tuple(out[60, 32]) == (0, 0, 255)
    assert spng_used == [where == "header"]


def test_xmp_orientation_in_the_header_is_applied(spng_used: list[bool]) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    out = assert_same(encode(halves(), "PNG", pnginfo=info), (64, 64))
    assert tuple(out[4, 32]) == (255, 0, 0) and tuple(out[60, 32]) == (0, 0, 255)
    assert spng_used == [True]


# --- damaged files and limits ----------------------------------------------------------------


def corrupt_image_data(data: bytes) -> bytes:
    """The same chunks, CRCs valid, with the compressed pixels scrambled half-way."""
    def scrambled(body: bytes) -> bytes:
        mid = len(body) // 2
        return body[:mid] + bytes(b ^ 0x5A for b in body[mid : mid + 64]) + body[mid + 64 :]

    return join_chunks((kind, scrambled(body) if kind == b"IDAT" else body) for kind, body in split_chunks(data))


def second_header(data: bytes) -> bytes:
    """The same PNG with its IHDR repeated, claiming half the height (Pillow reads the last one)."""
    chunks = split_chunks(data)
    kind, body = chunks[0]
    height = struct.unpack_from(">I", body, 4)[0] // 2
    return join_chunks([chunks[0], (kind, body[:4] + struct.pack(">I", height) + body[8:]), *chunks[1:]])


DAMAGED: dict[str, Callable[[bytes], bytes]] = {
    "truncated half-way": lambda d: d[: len(d) // 2],
    "truncated before IEND": lambda d: d[:-12],
    "scrambled image data": corrupt_image_data,
    "a second IHDR": second_header,
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_damaged_png_fails_as_with_pillow(damage: str, spng_used: list[bool]) -> None:
    data = DAMAGED[damage](encode(photo(), "PNG"))
    fast = outcome(lambda: decode_image(data, SIZE, MAX_PIXELS, MAX_BYTES))
    reference = outcome(lambda: pillow_only(data))
    if isinstance(reference, str):
        assert fast == reference
    else:
        assert isinstance(fast, np.ndarray) and np.array_equal(fast, reference)
    assert spng_used == [False]
    if damage in ("truncated half-way", "scrambled image data"):
        assert isinstance(fast, str) and "damaged or incomplete" in fast


def test_decode_bound_is_checked_before_libspng(spng_used: list[bool]) -> None:
    data = encode(Image.new("RGB", (2000, 2000), (9, 9, 9)), "PNG")
    with pytest.raises(TooLargeToDecode, match="over the limit of 8 MiB"):
        decode_image(data, SIZE, MAX_PIXELS, 8 * 2**20)
    assert spng_used == []  # refused from the header alone


def test_libspng_copy_must_fit_the_decode_bound_too(spng_used: list[bool]) -> None:
    data = encode(Image.fromarray(photo("astronaut")).resize((1000, 1000)), "PNG", compress_level=1)
    pillow_bytes, spng_bytes = 1000 * 1000 * 4, len(data) + 1000 * 1000 * 3  # its copy of the file, its array
    tight, roomy = pillow_bytes + spng_bytes - 1, pillow_bytes + spng_bytes
    outputs = [decode_image(data, SIZE, MAX_PIXELS, tight), decode_image(data, SIZE, MAX_PIXELS, roomy)]
    assert spng_used == [False, True]
    assert np.array_equal(outputs[0], outputs[1]) and np.array_equal(outputs[0], pillow_only(data))

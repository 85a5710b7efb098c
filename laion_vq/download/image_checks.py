"""Is a downloaded body a whole image of a sane size? Cheap checks before anything decodes it.

img2dataset hands every body to OpenCV, which decodes first and asks questions later: a 30,000×30,000
PNG (a few hundred KB on the wire) becomes 900 MB of pixels before `max_image_area` rejects it, and a
JPEG cut short (or cut short and zero-filled) decodes "successfully" into a grey-bottomed picture. These
checks read only magic bytes, the image header (PIL parses it lazily) and the end markers, so they cost
microseconds and refuse:

- empty bodies and bodies that are not an image format (HTML or text served as `.jpg`);
- images whose header promises more than `max_pixels` pixels (decompression bombs), before decoding;
- truncated files: a JPEG without an end-of-image marker after its last scan, a PNG without `IEND`,
  a WebP shorter than its RIFF header says.

Each refusal is a message that starts with its reason (`reasons.normalise` maps it to a label).

Two kinds of image OpenCV (as img2dataset calls it, `IMREAD_UNCHANGED`) gets wrong without an error
are rewritten losslessly (8-bit PNG) before it sees them: 16-bit images, which it resizes as 16-bit and
then saturates to an all-white JPEG, and images with an EXIF orientation, which it stores sideways
(browsers, and so LAION's captioners, saw them upright). No img2dataset here.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin

_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA"})
#: EXIF tag of the orientation (1: upright; 2–8: mirrored and/or rotated)
ORIENTATION = 0x0112

_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


#: Sizes of the BMP info headers that exist (OS/2 1.x, Windows 3.x, v2–v5): "BM" alone is too weak a sign.
_BMP_INFO_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def sniff_format(data: bytes) -> str | None:
    """The image format its magic bytes announce (`jpeg`, `png`, `gif`, `webp`, `bmp`, `tiff`), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    name = next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)
    if name == "bmp" and int.from_bytes(data[14:18], "little") not in _BMP_INFO_SIZES:
        return None
    return name


#: Start-of-frame markers (baseline, progressive, lossless, arithmetic…): they carry the image size.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


@dataclass(frozen=True)
class _JpegHeader:
    first_scan: int  # offset of the main image's first scan header (SOS); -1 if the file ends before it
    size: tuple[int, int] | None  # (width, height) from the frame header
    has_exif: bool


def _jpeg_header(data: bytes) -> _JpegHeader:
    """Walk the marker segments from the start, so markers inside an APP segment (an EXIF thumbnail is
    a whole JPEG) are skipped: the main scan's offset, the frame size and whether EXIF is present —
    what the checks need, without PIL (most LAION images are JPEGs, and this runs for every one)."""
    i, size, has_exif = 2, None, False
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:
            return _JpegHeader(i, size, has_exif)
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _JPEG_SOF and i + 9 <= len(data):
            size = (int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big"))
        elif marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
            has_exif = True
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return _JpegHeader(-1, size, has_exif)


def _describe_non_image(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "looks like HTML"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:1024].lower()):
        return "SVG (a vector format, not supported)"
    if head.startswith((b"{", b"[")):
        return "looks like JSON"
    return f"unknown format starting {data[:8].hex()}"


def _truncation(data: bytes, fmt: str, jpeg: _JpegHeader | None) -> str | None:
    if jpeg is not None:
        # Entropy-coded data never holds FF D9 (FF is stuffed as FF 00), so an end-of-image marker after
        # the main image's first scan header closes the image; a thumbnail's comes before that header.
        # Searched from the end, where it is: a forward search stops at every stuffed FF (0.7 µs/KB).
        if jpeg.first_scan < 0:
            return "JPEG ends before its image data"
        if data.rfind(b"\xff\xd9") < jpeg.first_scan:
            return "JPEG ends without an end-of-image marker"
    elif fmt == "png":
        if data.rfind(b"IEND") < 0:
            return "PNG ends without its IEND chunk"
    elif fmt == "webp":
        declared = int.from_bytes(data[4:8], "little") + 8
        if len(data) < declared:
            return f"WebP holds {len(data)} of the {declared} bytes its header declares"
    return None


def _is_16_bit(image: Image.Image, data: bytes, fmt: str) -> bool:
    if image.mode.startswith(("I;16", "I", "F")):
        return True
    if fmt == "png":
        return data[24:25] == b"\x10"  # IHDR bit depth
    if fmt == "tiff":
        assert isinstance(image, TiffImagePlugin.TiffImageFile)  # PIL opens the bytes sniffed as TIFF as one
        return 16 in (image.tag_v2.get(258) or ())  # BitsPerSample
    return False


def _orientation(image: Image.Image, fmt: str) -> int:
    """The EXIF orientation, read only where the header parse already found EXIF: PIL's `getexif` on a
    PNG without it decodes the whole image looking for a late chunk (milliseconds per image)."""
    if fmt != "tiff" and "exif" not in image.info:
        return 1
    return int(image.getexif().get(ORIENTATION, 1))


def _rewrite_8bit_upright(image: Image.Image, sixteen_bit: bool) -> bytes:
    """The image as an 8-bit PNG, EXIF orientation applied: what a browser shows, losslessly."""
    image.load()
    if sixteen_bit and image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    elif image.mode in ("I", "F"):
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) / 256, 0, 255).astype(np.uint8))
    if image.mode not in _PNG_MODES:  # CMYK, YCbCr, LAB…: PNG holds none of them
        image = image.convert("RGB")
    image = ImageOps.exif_transpose(image) or image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _bomb(width: int, height: int, max_pixels: float) -> str | None:
    if width * height <= max_pixels:
        return None
    return f"decompression bomb: {width}x{height} = {width * height / 1e6:.0f} Mpx > {max_pixels / 1e6:.0f} Mpx allowed"


def prepare_image(data: bytes, max_pixels: float) -> tuple[bytes | None, str | None]:
    """(bytes for OpenCV to decode, None) when `data` is a whole image of at most `max_pixels` pixels,
    else (None, why not). The bytes are `data` itself, or an 8-bit upright rewrite (module docstring)."""
    if not data:
        return None, "empty body: 0 bytes"
    fmt = sniff_format(data)
    if fmt is None:
        return None, f"not an image: {_describe_non_image(data)}"
    jpeg = _jpeg_header(data) if fmt == "jpeg" else None
    truncated = _truncation(data, fmt, jpeg)
    if truncated:
        return None, f"truncated image: {truncated}"
    if jpeg is not None and jpeg.size is not None and not jpeg.has_exif:  # the common case: no PIL needed
        bomb = _bomb(*jpeg.size, max_pixels)
        return (None, bomb) if bomb else (data, None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # parses the header only
                bomb = _bomb(*image.size, max_pixels)
                if bomb:
                    return None, bomb
                sixteen_bit = _is_16_bit(image, data, fmt)
                if sixteen_bit or _orientation(image, fmt) != 1:
                    return _rewrite_8bit_upright(image, sixteen_bit), None
    except Image.DecompressionBombError as err:
        return None, f"decompression bomb: {err}"
    except Exception as err:  # any header PIL cannot parse is an image we cannot trust
        return None, f"undecodable image: {fmt}: {str(err)[:100]}"
    return data, None

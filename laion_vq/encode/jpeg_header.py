"""JPEG header sniffing: which images the batched nvJPEG path may take, read from the markers before the scan.

nvJPEG fails a whole batch for one image it cannot decode, and decodes some JPEGs unlike libjpeg (PIL) would;
`gpu_refusal` recognises those from the header so that they go to PIL instead of into the batch:

- not a JPEG (PNG/WebP/GIF left by other writers, empty or random bytes): nvJPEG decodes JPEG only;
- CMYK/YCCK (4 components): nvJPEG needs an opt-in it is not given and converts CMYK unlike PIL;
- grayscale (1 component): PIL's L→RGB is exact; kept on the path every other reader uses;
- RGB-coded JPEGs (Adobe APP14 transform 0, or 'R','G','B' component ids): nvJPEG would treat them as YCbCr;
- arithmetic, lossless, hierarchical coding or 12-bit samples: not supported by nvJPEG (PIL refuses most too);
- chroma sampling other than 4:4:4/4:2:2/4:4:0/4:2:0 with 1x1 chroma: nvJPEG raises on "unknown" ones;
- a frame size other than ``image_size``: PIL gives the stage's "image is WxH, expected SxS" reason;
- no end-of-image marker (truncated): nvJPEG may return a grey-filled image where PIL raises "truncated".

Bytes in, no torch or PIL: `laion_vq.encode.decode` routes each image with it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CMYK",
    "CODING",
    "COMPONENTS",
    "GRAYSCALE",
    "JPEG_MAGIC",
    "NOT_JPEG",
    "NO_EOI",
    "PRECISION",
    "RGB_CODED",
    "SUBSAMPLING",
    "UNPARSED_HEADER",
    "WRONG_SIZE",
    "JpegHeader",
    "gpu_refusal",
    "parse_jpeg_header",
]

JPEG_MAGIC = b"\xff\xd8\xff"

# Fallback reasons (keys of DecodedBatch.cpu_fallbacks) decided from the header, before the batch:
NOT_JPEG = "not jpeg"
UNPARSED_HEADER = "unparsed jpeg header"
CMYK = "cmyk/ycck"
GRAYSCALE = "grayscale"
RGB_CODED = "rgb-coded jpeg"
CODING = "not baseline/progressive huffman"
PRECISION = "not 8-bit"
COMPONENTS = "unusual component count"
SUBSAMPLING = "unusual chroma subsampling"
WRONG_SIZE = "wrong size"
NO_EOI = "no end-of-image marker"

# SOFn markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Baseline, extended sequential and progressive DCT, Huffman-coded: what nvJPEG decodes.
_GPU_SOF = frozenset({0xC0, 0xC1, 0xC2})
# (H, V) of the luma component, with both chroma components 1x1: 4:4:4, 4:2:2, 4:4:0, 4:2:0.
_GPU_LUMA_SAMPLING = frozenset({(1, 1), (2, 1), (1, 2), (2, 2)})
_RGB_COMPONENT_IDS = (ord("R"), ord("G"), ord("B"))


@dataclass(frozen=True)
class JpegHeader:
    """What the markers before the first scan say about a JPEG."""

    sof: int  #: the frame marker's second byte (0xC0 baseline, 0xC2 progressive, ...)
    precision: int
    height: int
    width: int
    components: tuple[tuple[int, int, int], ...]  #: (component id, H sampling, V sampling)
    adobe_transform: int | None  #: APP14 "Adobe" colour transform (0 = none/RGB or CMYK, 1 = YCbCr, 2 = YCCK)
    jfif: bool  #: an APP0 "JFIF" segment was seen


def parse_jpeg_header(data: bytes) -> JpegHeader | None:
    """Walk the marker segments from SOI to the first SOS; None when there is no complete frame header."""
    if not data.startswith(JPEG_MAGIC):
        return None
    n, i = len(data), 2
    sof: tuple[int, int, int, int, tuple[tuple[int, int, int], ...]] | None = None
    adobe: int | None = None
    jfif = False
    while i + 1 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS: the header is over
            break
        if i + 4 > n:
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        end = i + 2 + length
        if length < 2 or end > n:
            return None
        payload = data[i + 4 : end]
        if marker == 0xE0 and payload.startswith(b"JFIF\x00"):
            jfif = True
        elif marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= 12:
            adobe = payload[11]
        elif marker in _SOF_MARKERS and sof is None:
            if len(payload) < 6:
                return None
            count = payload[5]
            if len(payload) < 6 + 3 * count:
                return None
            comps = tuple(
                (payload[6 + 3 * c], payload[7 + 3 * c] >> 4, payload[7 + 3 * c] & 0x0F) for c in range(count)
            )
            sof = (
                marker,
                payload[0],
                int.from_bytes(payload[1:3], "big"),
                int.from_bytes(payload[3:5], "big"),
                comps,
            )
        i = end
    if sof is None:
        return None
    return JpegHeader(*sof, adobe_transform=adobe, jfif=jfif)


def gpu_refusal(data: bytes, image_size: int) -> str | None:
    """Why these bytes should not go to nvJPEG (a fallback reason), or None when they can."""
    if not data.startswith(JPEG_MAGIC):
        return NOT_JPEG
    header = parse_jpeg_header(data)
    if header is None:
        return UNPARSED_HEADER
    ncomp = len(header.components)
    if ncomp == 4:
        return CMYK
    if header.sof not in _GPU_SOF:
        return CODING
    if header.precision != 8:
        return PRECISION
    if ncomp == 1:
        return GRAYSCALE
    if ncomp != 3:
        return COMPONENTS
    # libjpeg's rule for 3 components: JFIF or Adobe transform 1 means YCbCr; Adobe 0, or ids R,G,B, means RGB
    rgb_ids = tuple(c[0] for c in header.components) == _RGB_COMPONENT_IDS
    if header.adobe_transform == 0 or (header.adobe_transform is None and not header.jfif and rgb_ids):
        return RGB_CODED
    (_, lh, lv), *chroma = header.components
    if (lh, lv) not in _GPU_LUMA_SAMPLING or any((h, v) != (1, 1) for _, h, v in chroma):
        return SUBSAMPLING
    if (header.width, header.height) != (image_size, image_size):
        return WRONG_SIZE
    # Padding after EOI is allowed; a stream that stops before it is truncated (or has trailing junk).
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return NO_EOI
    return None

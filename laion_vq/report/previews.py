"""Small PNG previews for asset metadata: code-usage histograms and sample/reconstruction grids.

Only PIL and numpy, no Dagster: callers wrap :func:`png_markdown` output in ``MetadataValue.md``
(images embedded as ``data:`` URIs, the pattern Dagster's docs use), so the picture shows up in the
UI next to the numbers. Every renderer returns optimised PNG bytes of a few KB to a few tens of KB.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["code_usage_png", "png_markdown", "samples_vs_reconstructions_png"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Palette of the histogram (a 4-colour "P" image keeps the PNG tiny).
_BACKGROUND, _BAR, _AXIS, _TEXT = 0, 1, 2, 3
_HISTOGRAM_PALETTE = [255, 255, 255, 70, 110, 180, 90, 90, 90, 30, 30, 30]
_LABEL_HEIGHT = 14  # px reserved above the bars for the text label
_GRID_GAP = 4
_GRID_BACKGROUND = (255, 255, 255)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _column_totals(usage: np.ndarray, width: int) -> np.ndarray:
    """Sum of ``usage`` over ``width`` equal runs of consecutive codes (repeating codes if there are fewer)."""
    n = usage.shape[0]
    if n >= width:
        starts = (np.arange(width, dtype=np.int64) * n) // width  # strictly increasing since n >= width
        return np.add.reduceat(usage, starts)
    return usage[(np.arange(width, dtype=np.int64) * n) // width]


def code_usage_png(usage: np.ndarray, width: int = 512, height: int = 96) -> bytes:
    """Histogram of how often each code was used, as PNG bytes of ``width`` x ``height`` px.

    ``usage[i]`` is the count of code ``i`` (length ``n_embed``, non-negative). Codes are split into
    ``width`` runs of consecutive codes, one pixel column each (with fewer codes than columns, a code
    spans several columns), and each column's bar shows the run's summed count on a **log scale**:
    height proportional to ``log1p(count) / log1p(max count)``, so rarely used codes stay visible
    next to very frequent ones; empty columns have no bar. A baseline is drawn along the bottom and a
    label like ``"8192 codes, 812 used (log scale)"`` at the top left, in PIL's default font.
    """
    usage = np.asarray(usage)
    if usage.ndim != 1 or usage.size == 0:
        raise ValueError(f"usage must be a non-empty 1-D array of per-code counts, got shape {usage.shape}")
    if not (np.issubdtype(usage.dtype, np.integer) or np.issubdtype(usage.dtype, np.floating)):
        raise ValueError(f"usage must hold numbers, got dtype {usage.dtype}")
    usage = usage.astype(np.float64)
    if not np.isfinite(usage).all() or (usage < 0).any():
        raise ValueError("usage counts must be finite and >= 0")
    if width < 16 or height < _LABEL_HEIGHT + 8:
        raise ValueError(f"image too small: need width >= 16 and height >= {_LABEL_HEIGHT + 8}, got {width}x{height}")

    columns = _column_totals(usage, width)
    baseline = height - 1
    plot_height = baseline - _LABEL_HEIGHT  # bars grow up from the row above the baseline
    peak = float(columns.max())
    bar = np.zeros(width, dtype=np.int64)
    if peak > 0:
        scaled = np.log1p(columns) / np.log1p(peak)
        bar = np.where(columns > 0, np.maximum(1, np.round(scaled * plot_height)), 0).astype(np.int64)

    # Rasterise bars with numpy (one column per pixel), then add axis and label with ImageDraw.
    pixels = np.full((height, width), _BACKGROUND, dtype=np.uint8)
    rows = np.arange(height)[:, None]
    pixels[(rows < baseline) & (rows >= baseline - bar[None, :])] = _BAR
    pixels[baseline, :] = _AXIS
    image = Image.frombytes("P", (width, height), pixels.tobytes())
    image.putpalette(_HISTOGRAM_PALETTE)
    used = int(np.count_nonzero(usage))
    ImageDraw.Draw(image).text(
        (2, 1), f"{usage.size} codes, {used} used (log scale)", fill=_TEXT, font=ImageFont.load_default()
    )
    return _png_bytes(image)


def _thumbnail(image: np.ndarray, thumb: int) -> Image.Image:
    pil = Image.fromarray(image)
    if pil.size == (thumb, thumb):
        return pil
    # Area averaging (BOX) when shrinking; plain pixel repetition when enlarging.
    resample = Image.Resampling.BOX if image.shape[0] >= thumb else Image.Resampling.NEAREST
    return pil.resize((thumb, thumb), resample)


def _check_batch(name: str, images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"{name} must be a uint8 numpy array (N, S, S, 3), got {getattr(images, 'dtype', images)}")
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2] or images.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, S, S, 3), got {images.shape}")


def samples_vs_reconstructions_png(
    originals: np.ndarray,
    reconstructions: np.ndarray,
    thumb: int = 96,
    max_items: int = 6,
    colors: int | None = 256,
    labels: tuple[str, str] | None = None,
) -> bytes:
    """Two-row grid as PNG bytes: the first ``max_items`` originals on top, their reconstructions below.

    ``labels`` (e.g. ``("originals", "reconstructions by vqgan_gumbel_f8, RANDOM weights")``) are written in a
    strip of 14 px above each row, so the picture says what it shows without its caption.

    Both inputs are uint8 RGB (N, S, S, 3) of the same shape. Each image becomes a ``thumb`` x ``thumb``
    thumbnail (area-averaged when shrinking), separated and framed by white gaps of 4 px, so the
    picture is ``k * thumb + (k + 1) * 4`` wide and ``2 * thumb + 12`` high for ``k = min(N, max_items)``.

    ``colors`` (default 256) stores the grid with one adaptive palette of that many colours, shared by
    both rows so the comparison stays fair, with Floyd-Steinberg dithering: for six 96 px photos about
    65 KB instead of about 180 KB as RGB; pixels move by ~3 levels per channel on average but local
    averages stay within ~1 level (images with many saturated colours fare worse). ``None`` keeps
    exact RGB thumbnails.
    """
    _check_batch("originals", originals)
    _check_batch("reconstructions", reconstructions)
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals {originals.shape} and reconstructions {reconstructions.shape} differ in shape")
    if thumb < 1 or max_items < 1:
        raise ValueError(f"thumb and max_items must be >= 1, got {thumb} and {max_items}")
    if colors is not None and not 2 <= colors <= 256:
        raise ValueError(f"colors must be in [2, 256] or None, got {colors}")
    k = min(originals.shape[0], max_items)
    if k == 0:
        raise ValueError("no images to show")
    gap = _GRID_GAP
    strip = _LABEL_HEIGHT if labels else 0
    font = ImageFont.load_default()
    width = k * thumb + (k + 1) * gap
    if labels:  # wide enough for its labels, also with one or two samples
        width = max(width, 2 * gap + int(max(font.getlength(label) for label in labels)))
    canvas = Image.new("RGB", (width, 2 * (thumb + strip) + 3 * gap), _GRID_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, images in enumerate((originals, reconstructions)):
        top = gap + row * (thumb + strip + gap)
        if labels:
            draw.text((gap, top), labels[row], fill=(30, 30, 30), font=font)
        for i in range(k):
            canvas.paste(_thumbnail(images[i], thumb), (gap + i * (thumb + gap), top + strip))
    if colors is not None:
        palette = canvas.quantize(colors=colors, method=Image.Quantize.FASTOCTREE)
        canvas = canvas.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    return _png_bytes(canvas)


def png_markdown(png: bytes, alt: str) -> str:
    """Markdown that shows ``png`` inline: ``![alt](data:image/png;base64,...)``.

    Use with ``dagster.MetadataValue.md``. Brackets and line breaks in ``alt`` are replaced so they
    cannot end the alt text early.
    """
    if bytes(png[:8]) != _PNG_SIGNATURE:
        raise ValueError("not PNG data (missing the PNG signature)")
    safe_alt = " ".join(alt.split()).replace("[", "(").replace("]", ")")
    return f"![{safe_alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"

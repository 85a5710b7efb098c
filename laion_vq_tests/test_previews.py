"""PNG previews for asset metadata: sizes, content, and the markdown embedding."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from laion_vq.report.previews import code_usage_png, png_markdown, samples_vs_reconstructions_png


def _decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image


def _usage(seed: int, n: int = 8192, used: int = 812) -> np.ndarray:
    rng = np.random.default_rng(seed)
    usage = np.zeros(n, dtype=np.int64)
    usage[rng.choice(n, used, replace=False)] = rng.integers(1, 5000, used)
    return usage


def _smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Low-frequency colour images, so downscaling by any sensible filter gives nearly the same result."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float64)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        up = Image.fromarray(coarse[i].astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(up)
    return out


def _blocks(image: np.ndarray, k: int) -> np.ndarray:
    """Means over k x k pixel blocks of an (S, S, 3) image."""
    s = image.shape[0] // k
    return image[: s * k, : s * k].reshape(s, k, s, k, 3).mean(axis=(1, 3))


def test_code_usage_png_size_and_smallness() -> None:
    png = code_usage_png(_usage(0))
    image = _decode(png)
    assert image.size == (512, 96)
    assert len(png) < 8_000
    assert _decode(code_usage_png(_usage(0), width=300, height=40)).size == (300, 40)


def test_code_usage_png_reflects_usage() -> None:
    def pixels(usage: np.ndarray) -> np.ndarray:
        return np.asarray(_decode(code_usage_png(usage)).convert("L"))

    a, b = pixels(_usage(0)), pixels(_usage(1))
    assert len(np.unique(a)) > 1  # not a constant image
    bars_a, bars_b = a[20:-1], b[20:-1]  # below the label, above the baseline
    assert not np.array_equal(bars_a, bars_b)
    # one code used only in the first half: bars only there
    half = np.zeros(8192, dtype=np.int64)
    half[:4096:3] = 7
    bars = pixels(half)[20:-1] < 250
    assert bars[:, :250].any() and not bars[:, 260:].any()
    # nothing used: no bars at all, but still the baseline
    empty = pixels(np.zeros(8192, dtype=np.int64))
    assert (empty[20:-1] > 250).all() and (empty[-1] < 250).all()
    # fewer codes than columns works too
    assert _decode(code_usage_png(np.arange(10))).size == (512, 96)


def test_code_usage_png_label_depends_on_counts() -> None:
    # The text differs with the number of used codes; the bars are identical here.
    few, many = np.zeros(8192, dtype=np.int64), np.zeros(8192, dtype=np.int64)
    few[0], many[0], many[1] = 5, 5, 5
    top = lambda u: np.asarray(_decode(code_usage_png(u)).convert("L"))[:12]  # noqa: E731
    assert not np.array_equal(top(few), top(many))


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 3)), np.zeros(0), np.array([1, -1]), np.array([1.0, np.nan]), np.array(["a"])],
)
def test_code_usage_png_rejects_bad_usage(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        code_usage_png(bad)


@pytest.mark.parametrize("colors", [256, None])
def test_grid_rows_are_originals_and_reconstructions(colors: int | None) -> None:
    originals = _smooth_images(4, 192, seed=0)
    reconstructions = _smooth_images(4, 192, seed=1)
    png = samples_vs_reconstructions_png(originals, reconstructions, thumb=96, max_items=6, colors=colors)
    grid = np.asarray(_decode(png).convert("RGB")).astype(np.float64)
    gap, thumb = 4, 96
    assert grid.shape == (2 * thumb + 3 * gap, 4 * thumb + 5 * gap, 3)
    for row, images in enumerate((originals, reconstructions)):
        for i in range(4):
            top, left = gap + row * (thumb + gap), gap + i * (thumb + gap)
            tile = grid[top : top + thumb, left : left + thumb]
            # independent downscale (2x2 block means); with a dithered palette, compare 8x8 local averages
            expected = _blocks(images[i].astype(np.float64), 2)
            k, tolerance = (1, 1.0) if colors is None else (8, 4.0)  # synthetic saturated colours: palette worst case
            assert np.abs(_blocks(tile, k) - _blocks(expected, k)).mean() < tolerance, (row, i)
            other = _blocks((reconstructions if row == 0 else originals)[i].astype(np.float64), 2)
            assert np.abs(_blocks(tile, k) - _blocks(other, k)).mean() > 20
    assert (grid[:gap] > 245).all() and (grid[:, :gap] > 245).all()  # white frame


def test_grid_limits_items_and_stays_small() -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (10, 256, 256, 3), dtype=np.uint8)  # worst case for PNG compression
    png = samples_vs_reconstructions_png(noisy, noisy[::-1], thumb=64, max_items=3)
    assert _decode(png).size == (3 * 64 + 4 * 4, 2 * 64 + 3 * 4)
    assert len(png) < 60_000
    small = _smooth_images(2, 32, seed=2)  # enlarging works too
    assert _decode(samples_vs_reconstructions_png(small, small)).size == (2 * 96 + 3 * 4, 2 * 96 + 3 * 4)


def test_grid_rejects_bad_inputs() -> None:
    good = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="differ in shape"):
        samples_vs_reconstructions_png(good, good[:1])
    with pytest.raises(ValueError, match="uint8"):
        samples_vs_reconstructions_png(good.astype(np.float32), good)
    with pytest.raises(ValueError, match="shape"):
        samples_vs_reconstructions_png(good[..., 0], good[..., 0])
    with pytest.raises(ValueError, match="no images"):
        samples_vs_reconstructions_png(good[:0], good[:0])


def test_png_markdown_round_trips() -> None:
    png = code_usage_png(_usage(3))
    md = png_markdown(png, "code usage [shard 7]\nline")
    match = re.fullmatch(r"!\[([^\]\n]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert match is not None
    assert match.group(1) == "code usage (shard 7) line"
    assert base64.b64decode(match.group(2)) == png
    with pytest.raises(ValueError, match="PNG"):
        png_markdown(b"GIF89a", "x")

"""A shard's code-usage histogram as compact text, stored in its code parquet's footer (`laion_vq` key-value
metadata, `code_usage`), and the report's cache of those texts (`CodeUsageCache`): machine data, kept off the
metadata users read in the UI.

Format `u32z1:<base64>`: the counts as little-endian uint32 (a shard holds ~10M codes, far below 2**32),
zlib level 9, base64. The prefix names the format, so a later encoding can be told apart instead of being
misread as counts. A trained f8 model's shard (9,000 images × 1,024 codes, all 8,192 codes used) packs to
~19,000 characters; exact counts cannot get much smaller (each holds ~11 bits of entropy).

Summing 10,000 shards is the report's one per-row loop: base64 is decoded for the whole column at once by
polars, and each row then costs one zlib inflate into a buffer of the exact size plus one `np.add`.
"""

from __future__ import annotations

import base64
import binascii
import zlib

import numpy as np
import polars as pl

PREFIX = "u32z1:"
_DTYPE = np.dtype("<u4")


def pack_code_usage(counts: np.ndarray) -> str:
    """`counts[i]` = how often code i was used → `u32z1:` text. Refuses what uint32 cannot hold exactly."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"code usage must be a non-empty 1-D array of counts, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"code usage must hold integer counts, got dtype {counts.dtype}")
    if int(counts.min()) < 0 or int(counts.max()) > np.iinfo(_DTYPE).max:
        raise ValueError(f"code usage counts must be in [0, 2**32), got [{counts.min()}, {counts.max()}]")
    packed = zlib.compress(counts.astype(_DTYPE).tobytes(), 9)
    return PREFIX + base64.b64encode(packed).decode("ascii")


def _inflate(payload: bytes, n_embed: int) -> np.ndarray:
    """zlib payload → read-only uint32 view of exactly `n_embed` counts, or ValueError."""
    expected = n_embed * _DTYPE.itemsize
    try:
        raw = zlib.decompress(payload, bufsize=expected)  # the exact size: no regrowing of the output buffer
    except zlib.error as err:
        raise ValueError(f"code usage text is not valid base64 zlib data: {err}") from None
    if len(raw) != expected:
        raise ValueError(
            f"code usage holds {len(raw) // _DTYPE.itemsize} counts ({len(raw)} bytes), expected n_embed={n_embed}"
        )
    return np.frombuffer(raw, dtype=_DTYPE)


def unpack_code_usage(text: str, n_embed: int) -> np.ndarray:
    """`u32z1:` text → int64 counts of length `n_embed`; a wrong prefix, payload or length is a ValueError."""
    if not isinstance(text, str) or not text.startswith(PREFIX):
        shown = text[:12] if isinstance(text, str) else type(text).__name__
        raise ValueError(f"code usage text must start with {PREFIX!r}, got {shown!r}")
    try:
        payload = binascii.a2b_base64(text[len(PREFIX) :], strict_mode=True)
    except binascii.Error as err:
        raise ValueError(f"code usage text is not valid base64 zlib data: {err}") from None
    return _inflate(payload, n_embed).astype(np.int64)


def sum_packed_code_usage(texts: pl.Series, n_embed: int) -> tuple[np.ndarray, list[int]]:
    """Sum of many shards' `u32z1:` texts (nulls skipped) as int64, and the positions of unreadable ones:
    counted, not fatal, so one bad metadata entry cannot stop a report over 10,000 shards."""
    texts = texts.cast(pl.String)
    missing = texts.is_null().to_list()  # flags, not the texts: turning ~190 MB of text into str costs ~0.3 s
    prefixed = texts.str.starts_with(PREFIX).to_list()
    payloads = texts.str.slice(len(PREFIX)).str.decode("base64", strict=False).to_list()
    total = np.zeros(n_embed, dtype=np.int64)
    unreadable: list[int] = []
    for position, (absent, ok, payload) in enumerate(zip(missing, prefixed, payloads, strict=True)):
        if absent:
            continue
        if not ok or payload is None:
            unreadable.append(position)
            continue
        try:
            np.add(total, _inflate(payload, n_embed), out=total)
        except ValueError:
            unreadable.append(position)
    return total, unreadable


def read_footer_code_usage(url: str) -> str | None:
    """The `code_usage` text a code parquet's footer holds (None for files written before it was stored there)."""
    from laion_vq.shards.codes import read_codes_provenance

    value = read_codes_provenance(url).get("code_usage")
    return value if isinstance(value, str) else None


def cached_code_usage(
    cache_url: str, files: dict[str, tuple[str, float]], threads: int = 16
) -> tuple[dict[str, str | None], int]:
    """Each shard's usage text, for `files` = shard → (code parquet URL, its materialization timestamp).

    The cache (a parquet: shard, stamp, code_usage) keeps what earlier reports read, so a report reads the
    footers of new or re-encoded shards only; the updated cache is published atomically. Returns the texts and
    how many footers were read. A footer that cannot be read is None (the report counts it as unreadable).
    """
    from concurrent.futures import ThreadPoolExecutor

    from laion_vq.shards.storage import exists, publish_bytes, read_bytes

    cached: dict[str, tuple[float, str | None]] = {}
    if exists(cache_url):
        frame = pl.read_parquet(read_bytes(cache_url))
        cached = {s: (t, u) for s, t, u in frame.select("shard", "stamp", "code_usage").iter_rows()}
    stale = [shard for shard, (_, stamp) in files.items() if cached.get(shard, (None,))[0] != stamp]

    def read(shard: str) -> str | None:
        try:
            return read_footer_code_usage(files[shard][0])
        except (OSError, ValueError):
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(stale)))) as pool:
        fresh = dict(zip(stale, pool.map(read, stale), strict=True))
    texts = {shard: fresh[shard] if shard in fresh else cached[shard][1] for shard in files}
    if stale or set(cached) - set(files):
        import io

        frame = pl.DataFrame(
            {"shard": list(files), "stamp": [files[s][1] for s in files], "code_usage": list(texts.values())},
            schema={"shard": pl.String, "stamp": pl.Float64, "code_usage": pl.String},
        )
        buffer = io.BytesIO()
        frame.write_parquet(buffer, compression="zstd")
        publish_bytes(buffer.getvalue(), cache_url)
    return texts, len(stale)

"""Stage 3: encode shard N's downloaded images with the VQGAN and publish `codes/<model>/NNNNN.parquet`."""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from laion_vq import settings
from laion_vq.shards.codes import build_codes_table, check_codes_table, read_codes_provenance, write_codes_parquet
from laion_vq.shards.storage import StorageLayout, exists, read_bytes, size
from laion_vq.shards.tar_reader import CorruptShardError, iter_samples
from laion_vq.stages.upstream import require_upstream


@dataclass
class CodeShardResult:
    shard_id: int
    path: str
    status_rows: int
    downloaded: int
    encoded: int
    undecodable: dict[str, int]
    undecodable_keys: list[str]
    bytes: int
    seconds: float
    encode_seconds: float
    distinct_codes: int
    code_usage: np.ndarray | None = field(default=None, repr=False)
    #: the first `keep_samples` encoded images and their codes, for previews
    sample_images: np.ndarray | None = field(default=None, repr=False)
    sample_codes: np.ndarray | None = field(default=None, repr=False)

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0


def _decode_rgb(data: bytes, image_size: int) -> np.ndarray:
    """JPEG bytes → HxWx3 uint8; wrong size or undecodable is a ValueError with the reason."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
    if rgb.size != (image_size, image_size):
        raise ValueError(f"image is {rgb.size[0]}x{rgb.size[1]}, expected {image_size}x{image_size}")
    return np.asarray(rgb, dtype=np.uint8)


def _status_rows(layout: StorageLayout, shard_id: int) -> dict[str, dict]:
    url = layout.image_status(shard_id)
    require_upstream(url, "image_tars", read=False)
    try:
        table = pq.read_table(io.BytesIO(read_bytes(url)))
    except Exception as err:  # noqa: BLE001 - any read failure means the shard cannot be trusted
        raise CorruptShardError(f"{url}: unreadable img2dataset status parquet: {err}") from err
    if "key" not in table.column_names or "status" not in table.column_names:
        raise CorruptShardError(f"{url}: status parquet lacks key/status columns: {table.column_names}")
    return {row["key"]: row for row in table.to_pylist()}


class CodesVersionError(RuntimeError):
    """Codes on storage made by another checkpoint/precision/index rule than this run's (kept as they are)."""


#: What makes codes differ: re-encoding with any of these changed is a new version of the dataset.
VERSION_KEYS = ("checkpoint_sha256", "dtype", "index_rule")


def refuse_other_version(dest: str, provenance: dict) -> None:
    """Raise CodesVersionError when `dest` exists and was made with other VERSION_KEYS than `provenance`:
    a new checkpoint or mode goes side by side (another codes folder), never silently over the old."""
    if not exists(dest):
        return
    try:
        stored = read_codes_provenance(dest)
    except Exception:  # noqa: BLE001 - a corrupted parquet is no version to protect: re-encoding repairs it
        return
    differ = {k: (stored[k], provenance[k]) for k in VERSION_KEYS if k in stored and k in provenance}
    differ = {k: v for k, v in differ.items() if v[0] != v[1]}
    if differ:
        what = "; ".join(f"{k}: stored {old!s:.16} ≠ this run {new!s:.16}" for k, (old, new) in differ.items())
        raise CodesVersionError(
            f"{dest} was encoded differently ({what}). Nothing was overwritten. Re-encode side by side with "
            f"{settings.CODES_NAME.env}=<a new name> (codes/<name>/), or set {settings.REPLACE_CODES.env}=1 "
            "(the encoder resource's replace_codes) to replace these codes."
        )


def encode_code_shard(
    layout: StorageLayout,
    shard_id: int,
    *,
    model_name: str,
    encode: Callable[[np.ndarray, list[str]], np.ndarray],
    grid: int,
    n_embed: int,
    image_size: int = 256,
    batch_size: int = 64,
    provenance: dict | None = None,
    progress: Callable[[str], None] | None = None,
    keep_samples: int = 0,
    codes_name: str | None = None,
    replace_other_versions: bool = False,
) -> CodeShardResult:
    """Encode every downloaded image of the shard and publish `codes/<codes_name>/NNNNN.parquet`
    (`codes_name` defaults to the model name).

    Each row's `image_sha256` is the sha256 of the JPEG bytes read from the tar, so identical bytes can be
    told to have given identical codes (on CPU fp32, whatever the threads, batch size or load).

    `encode(batch, keys)` maps an (N, S, S, 3) uint8 batch and its N sample keys to (N, grid, grid) integer
    codes (the keys seed the `sample` index rule; `argmax` ignores them). Images that fail to
    decode are counted by reason and listed, never dropped silently; a tar that disagrees with its status
    parquet, or output that breaks the contract, raises CorruptShardError and publishes nothing. A code
    parquet already made by another checkpoint, precision or index rule is not overwritten
    (`refuse_other_version`) unless `replace_other_versions`.
    """
    start = time.perf_counter()
    dest = layout.code_shard(codes_name or model_name, shard_id)
    if not replace_other_versions:
        refuse_other_version(dest, provenance or {})
    status = _status_rows(layout, shard_id)
    success_keys = {k for k, row in status.items() if row["status"] == "success"}
    tar_url = layout.image_tar(shard_id)
    require_upstream(tar_url, "image_tars", read=False)

    keys: list[str] = []
    image_sha256: list[str] = []
    codes: list[np.ndarray] = []
    samples: list[np.ndarray] = []
    undecodable: Counter[str] = Counter()
    undecodable_keys: list[str] = []
    tar_keys: set[str] = set()
    encode_seconds = 0.0
    pending: list[tuple[str, bytes]] = []

    def flush(pool: ThreadPoolExecutor) -> None:
        nonlocal encode_seconds
        decoded = list(pool.map(lambda kv: _safe_decode(kv, image_size), pending))
        batch_keys = [k for k, img, _, _ in decoded if img is not None]
        for k, img, reason, _ in decoded:
            if img is None:
                undecodable[reason] += 1
                undecodable_keys.append(k)
        if batch_keys:
            batch = np.stack([img for _, img, _, _ in decoded if img is not None])
            t0 = time.perf_counter()
            out = np.asarray(encode(batch, batch_keys))
            encode_seconds += time.perf_counter() - t0
            if out.shape != (len(batch_keys), grid, grid):
                raise RuntimeError(f"encoder returned shape {out.shape}, expected {(len(batch_keys), grid, grid)}")
            keys.extend(batch_keys)
            image_sha256.extend(digest for _, img, _, digest in decoded if img is not None)
            codes.append(out)
            if len(samples) < keep_samples:
                samples.extend(batch[: keep_samples - len(samples)])
        pending.clear()
        if progress is not None:
            progress(f"shard {shard_id:05d}: {len(keys)} encoded, {sum(undecodable.values())} undecodable")

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for sample in iter_samples(tar_url):
            tar_keys.add(sample.key)
            image = sample.image
            if image is None:
                undecodable["no image file in tar sample"] += 1
                undecodable_keys.append(sample.key)
                continue
            pending.append((sample.key, image))
            if len(pending) >= batch_size:
                flush(pool)
        if pending:
            flush(pool)

    if tar_keys != success_keys:
        only_tar, only_status = sorted(tar_keys - success_keys), sorted(success_keys - tar_keys)
        raise CorruptShardError(
            f"{tar_url}: tar and status parquet disagree: {len(only_tar)} key(s) only in the tar "
            f"(e.g. {only_tar[:3]}), {len(only_status)} success key(s) missing from the tar (e.g. {only_status[:3]})"
        )

    all_codes = np.concatenate(codes) if codes else np.zeros((0, grid, grid), np.int16)
    table = build_codes_table(keys, all_codes, status, image_sha256)
    report = check_codes_table(table, shard_id, grid, n_embed)
    if not report.ok:
        raise CorruptShardError(f"shard {shard_id:05d}: encoded output breaks the contract: {report.problems}")
    file_meta = {
        "model": model_name,
        "grid": grid,
        "n_embed": n_embed,
        "shard": f"{shard_id:05d}",
        "source_tar_bytes": size(tar_url),
        "undecodable": dict(undecodable),
        # so an audit can tell a key left out on purpose from a lost one
        "undecodable_keys": sorted(undecodable_keys),
        **(provenance or {}),
    }
    nbytes = write_codes_parquet(table, dest, file_meta)
    return CodeShardResult(
        shard_id=shard_id,
        path=dest,
        status_rows=len(status),
        downloaded=len(success_keys),
        encoded=table.num_rows,
        undecodable=dict(undecodable),
        undecodable_keys=sorted(undecodable_keys),
        bytes=nbytes,
        seconds=time.perf_counter() - start,
        encode_seconds=encode_seconds,
        distinct_codes=report.distinct_codes,
        code_usage=report.usage,
        sample_images=np.stack(samples) if samples else None,
        sample_codes=all_codes[: len(samples)] if samples else None,
    )


def _safe_decode(item: tuple[str, bytes], image_size: int) -> tuple[str, np.ndarray | None, str, str]:
    """(key, image or None, failure reason, sha256 hex of the very bytes decoded)."""
    key, data = item
    digest = hashlib.sha256(data).hexdigest()
    try:
        return key, _decode_rgb(data, image_size), "", digest
    except Exception as err:  # noqa: BLE001 - every decode failure is counted by its reason
        reason = re.sub(r"\s*<[^>]*>|0x[0-9a-fA-F]+", "", str(err)).strip()[:120]
        return key, None, f"{type(err).__name__}: {reason}" if reason else type(err).__name__, digest

"""Read img2dataset's webdataset tars: one `Sample` per key, with clear errors for corrupt tars."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from laion_vq.shards.storage import filesystem


class CorruptShardError(RuntimeError):
    """A tar (or its status parquet) that cannot be read or does not add up."""


class TruncatedTarError(CorruptShardError):
    """The tar ends (or fails to read) part way: every sample yielded before it is whole."""


@dataclass
class Sample:
    """The files of one webdataset sample, keyed by extension (`jpg`, `txt`, `json`, …)."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def image(self) -> bytes | None:
        for ext in ("jpg", "jpeg", "png", "webp"):
            if ext in self.files:
                return self.files[ext]
        return None

    @property
    def meta(self) -> dict:
        raw = self.files.get("json")
        return json.loads(raw) if raw else {}


def _split(name: str) -> tuple[str, str]:
    """`dir/000010002.jpg` → (`000010002`, `jpg`), the webdataset convention (key = up to the first dot)."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


def iter_samples(url: str) -> Iterator[Sample]:
    """Stream samples from a webdataset tar (local path or fsspec URL), grouping members by key.

    Raises CorruptShardError naming the tar and the member where reading failed (garbage tar, a key split
    across non-adjacent members); a tar that ends or fails part way raises TruncatedTarError after yielding
    every sample read before the cut, so those can still be used and the rest counted as lost.
    """
    fs, path = filesystem(url)
    current: Sample | None = None
    seen: set[str] = set()
    truncated: TruncatedTarError | None = None
    try:
        with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split(member.name)
                if not key or not ext:
                    raise CorruptShardError(f"{url}: member {member.name!r} is not a webdataset key.ext name")
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if len(data) != member.size:
                    raise TruncatedTarError(f"{url}: member {member.name!r} is truncated")
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    if key in seen:
                        raise CorruptShardError(f"{url}: key {key} appears in two separate places")
                    seen.add(key)
                    current = Sample(key)
                current.files[ext] = data
    except TruncatedTarError as err:
        truncated = err
    except CorruptShardError:
        raise
    except (tarfile.TarError, EOFError, OSError) as err:
        truncated = TruncatedTarError(f"{url}: corrupt or truncated tar after {len(seen)} sample(s): {err}")
        truncated.__cause__ = err
    if current is not None:
        yield current  # every file in it was read whole (a cut member never joins its sample)
    if truncated is not None:
        raise truncated

"""How a shard is downloaded: img2dataset's options (LAION-400M's by default) and the guards' limits.

One frozen, validated dataclass, so a bad setting fails at configuration time, not halfway through a
10,000-image shard. No img2dataset here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from laion_vq import settings
from laion_vq.download.guard import AddressPolicy, FetchLimits, parse_networks

#: img2dataset's defaults for `disallowed_header_directives` (X-Robots-Tag values we honour).
DEFAULT_DISALLOWED_HEADER_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")

_RESIZE_MODES = settings.RESIZE_MODE.choices or ()
_ENCODE_FORMATS = ("jpg", "png", "webp")
_HASHES = (None, "md5", "sha256", "sha512")


@dataclass(frozen=True)
class DownloadOptions:
    """How images are fetched and re-encoded; defaults are LAION-400M's (256px, border, jpg q95).

    Whatever an operator can set defaults to its setting's declared default (`laion_vq/settings.py`), so the
    two cannot drift; the environment's values are the downloader resource's to read (`defs/resources.py`),
    so options built in code get what they ask for. `allow_networks` alone reads its variable, at construction.

    `max_image_area` is in pixels of the ORIGINAL image, read from its header before anything decodes
    it: the guard against decompression bombs. `timeout` is seconds per socket operation, `deadline`
    seconds per image in all, `max_bytes` the largest body read, `max_redirects` the hops followed;
    `buffer_bytes` bounds the bodies a shard holds in memory at once (downloaded, not yet written).
    Downloads reach global addresses only; `allow_networks` (CIDRs) opens exceptions, by default those
    of `LAION_VQ_DOWNLOAD_ALLOW_NETWORKS` (tests and the demo open their loopback server that way).
    `compute_hash` stores that hash of the downloaded (original) bytes in the parquet/json, as
    img2dataset's `download()` does by default ("sha256"): it identifies the source image for dedup
    and provenance.
    """

    image_size: int = settings.IMAGE_SIZE.default
    resize_mode: str = settings.RESIZE_MODE.default
    resize_only_if_bigger: bool = False
    upscale_interpolation: str = "lanczos"
    downscale_interpolation: str = "area"
    encode_format: str = "jpg"
    encode_quality: int = settings.ENCODE_QUALITY
    timeout: float = settings.DOWNLOAD_TIMEOUT.default
    deadline: float = settings.DOWNLOAD_DEADLINE.default
    max_bytes: int = settings.DOWNLOAD_MAX_BYTES.default
    max_redirects: int = settings.DOWNLOAD_MAX_REDIRECTS.default
    buffer_bytes: int = settings.DOWNLOAD_BUFFER_BYTES.default
    allow_networks: tuple[str, ...] = field(
        default_factory=lambda: tuple(settings.DOWNLOAD_ALLOW_NETWORKS.get().split(","))
    )
    retries: int = settings.DOWNLOAD_RETRIES.default
    thread_count: int = settings.DOWNLOAD_THREADS.default
    max_image_area: float = 100_000_000
    max_aspect_ratio: float = float("inf")
    min_image_size: int = 0
    user_agent_token: str | None = "img2dataset"
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED_HEADER_DIRECTIVES
    compute_hash: str | None = "sha256"
    extract_exif: bool = True

    def __post_init__(self) -> None:
        # Fail at configuration time, not halfway through a 10,000-image shard.
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {self.resize_mode!r}")
        if self.encode_format not in _ENCODE_FORMATS:
            raise ValueError(f"encode_format must be one of {_ENCODE_FORMATS}, got {self.encode_format!r}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.thread_count < 1:
            raise ValueError(f"thread_count must be >= 1, got {self.thread_count}")
        if self.max_image_area <= 0:
            raise ValueError(f"max_image_area must be > 0 pixels, got {self.max_image_area}")
        if self.compute_hash not in _HASHES:
            raise ValueError(f"compute_hash must be one of {_HASHES}, got {self.compute_hash!r}")
        if isinstance(self.disallowed_header_directives, str):
            raise ValueError("disallowed_header_directives must be a sequence of directives, not a string")
        # Accept lists (or a comma-separated string of CIDRs) but store tuples so the options stay hashable.
        object.__setattr__(self, "disallowed_header_directives", tuple(self.disallowed_header_directives))
        networks = parse_networks(self.allow_networks)  # a bad CIDR fails here, naming it
        object.__setattr__(self, "allow_networks", tuple(str(n) for n in networks))
        self.fetch_limits()  # validates deadline, max_bytes, max_redirects
        if self.buffer_bytes < self.max_bytes:
            raise ValueError(f"buffer_bytes ({self.buffer_bytes}) must hold at least one max_bytes body")

    def fetch_limits(self) -> FetchLimits:
        """What the guard enforces for each image of a shard."""
        return FetchLimits(
            timeout=self.timeout,
            deadline=self.deadline,
            max_bytes=self.max_bytes,
            max_redirects=self.max_redirects,
            policy=AddressPolicy.from_cidrs(self.allow_networks),
            user_agent_token=None if self.user_agent_token is None else self.user_agent_token.strip().lower(),
            disallowed_directives=frozenset(d.strip().lower() for d in self.disallowed_header_directives),
        )

"""Failure messages → the short reasons a person recognises, for per-shard accounting.

img2dataset records free-text errors (`HTTP Error 404: Not Found`, `<urlopen error [Errno 111]
Connection refused>`, `Image decoding error`, OpenCV's messages…); our guard and image checks write
messages that start with their reason. `normalise` maps both to one label per cause, so a shard's
failures read `{"404": 312, "timeout": 40, "blocked address": 2}` instead of a thousand distinct strings.
The raw message stays in the status parquet's `error_message` column.
"""

from __future__ import annotations

import re

#: (label, pattern searched case-insensitively in the message), first match wins; order matters:
#: specific causes before the generic ones their messages also match.
_PATTERNS: tuple[tuple[str, str], ...] = (
    ("blocked address", r"^blocked address"),
    ("not http(s)", r"^not http\(s\)|unknown url type|unsupported scheme"),
    ("invalid url", r"^invalid url|nonnumeric port|no host given"),
    ("robots opt-out", r"x-robots-tag"),
    ("deadline", r"^deadline"),
    ("too large", r"^too large"),
    ("too many redirects", r"too many redirects|redirect loop|infinite loop"),
    ("decompression bomb", r"decompression bomb|image area too large"),
    ("truncated body", r"^truncated body|incompleteread"),
    ("truncated image", r"^truncated image|premature end"),
    ("empty response", r"^empty body"),
    ("not an image", r"^not an image|cannot identify image"),
    ("timeout", r"timed? ?out"),
    ("connection refused", r"connection refused|errno 111\b"),
    ("connection reset", r"connection reset|errno 104\b|remotedisconnected|connection aborted"),
    ("dns failure", r"^dns failure|name or service not known|nodename nor servname|getaddrinfo|errno -[23]\b"),
    ("tls error", r"^tls error|ssl|certificate"),
    ("hash mismatch", r"hash mismatch"),
    ("image too small", r"image too small"),
    ("aspect ratio too large", r"aspect ratio too large"),
    ("undecodable image", r"^undecodable image|image decoding error|imdecode|imencode|libpng|jpeg"),
)
_COMPILED = tuple((label, re.compile(pattern, re.IGNORECASE)) for label, pattern in _PATTERNS)
_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")

#: Every label `normalise` can return besides an HTTP status code ("404", "500"…) and "other".
REASONS: tuple[str, ...] = tuple(label for label, _ in _PATTERNS)


def normalise(message: str | None) -> str | None:
    """The reason label of a failure message (`"HTTP Error 404: Not Found"` → `"404"`); None for None."""
    if message is None:
        return None
    status = _HTTP_STATUS.search(message)
    if status:
        return status.group(1)
    return next((label for label, pattern in _COMPILED if pattern.search(message)), "other")

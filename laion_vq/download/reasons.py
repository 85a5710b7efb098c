"""Failure messages → the short reasons a person recognises, for per-shard accounting.

img2dataset records free-text errors (`HTTP Error 404: Not Found`, `<urlopen error [Errno 111]
Connection refused>`, `Image decoding error`, OpenCV's messages…); our guard and image checks write
messages that start with their reason. `normalise` maps both to one label per cause, so a shard's
failures read `{"404": 312, "timeout": 40, "blocked address": 2}` instead of a thousand distinct strings.
The raw message stays in the status parquet's `error_message` column.
"""

from __future__ import annotations

import re

#: Messages our guard and image checks write start with their reason: matched on the prefix only, first,
#: so a URL or host name inside the message ("…/timeout.jpg") cannot change the label.
_OWN_PREFIXES: tuple[tuple[str, str], ...] = (
    ("blocked address", "blocked address"),
    ("not http(s)", "not http(s)"),
    ("invalid url", "invalid url"),
    ("deadline", "deadline"),
    ("too large", "too large"),
    ("too many redirects", "too many redirects"),
    ("truncated body", "truncated body"),
    ("truncated image", "truncated image"),
    ("decompression bomb", "decompression bomb"),
    ("empty body", "empty response"),
    ("not an image", "not an image"),
    ("undecodable image", "undecodable image"),
    ("timeout", "timeout"),
    ("connection refused", "connection refused"),
    ("connection reset", "connection reset"),
    ("dns failure", "dns failure"),
    ("tls error", "tls error"),
    ("bad response", "bad response"),
    ("network error", "network error"),
)

#: img2dataset's and urllib's free-text messages: (label, pattern searched case-insensitively), first
#: match wins, specific causes before the generic ones their messages also match.
_PATTERNS: tuple[tuple[str, str], ...] = (
    ("too many redirects", r"redirect error that would lead to an infinite loop|too many redirects"),
    ("http status", r"^HTTP Error (\d{3})"),
    ("not http(s)", r"unknown url type|unsupported scheme"),
    ("invalid url", r"nonnumeric port|no host given|invalid url|can't contain control characters"),
    ("robots opt-out", r"^Use of image disallowed by X-Robots-Tag"),
    ("decompression bomb", r"image area too large"),
    ("truncated body", r"incompleteread"),
    ("truncated image", r"premature end of jpeg"),
    ("not an image", r"cannot identify image file"),
    ("timeout", r"timed out"),
    ("connection refused", r"connection refused|errno 111\b"),
    ("connection reset", r"connection reset|errno 104\b|remotedisconnected|remote end closed|connection aborted"),
    ("dns failure", r"name or service not known|nodename nor servname|temporary failure in name resolution"),
    ("tls error", r"ssl|certificate"),
    ("network error", r"network is unreachable|no route to host|errno 101\b|errno 113\b"),
    ("hash mismatch", r"^hash mismatch"),
    ("image too small", r"^image too small"),
    ("aspect ratio too large", r"^aspect ratio too large"),
    ("undecodable image", r"image decoding error|imdecode|imencode|libpng"),
)
_COMPILED = tuple((label, re.compile(pattern, re.IGNORECASE)) for label, pattern in _PATTERNS)

#: Every label `normalise` can return besides an HTTP status code ("404", "500"…) and "other".
REASONS: tuple[str, ...] = tuple(
    dict.fromkeys([label for _, label in _OWN_PREFIXES] + [label for label, _ in _PATTERNS if label != "http status"])
)


def normalise(message: str | None) -> str | None:
    """The reason label of a failure message (`"HTTP Error 404: Not Found"` → `"404"`); None for None."""
    if message is None:
        return None
    own = next((label for prefix, label in _OWN_PREFIXES if message.startswith(prefix)), None)
    if own is not None:
        return own
    for label, pattern in _COMPILED:
        found = pattern.search(message)
        if found:
            return found.group(1) if label == "http status" else label
    return "other"

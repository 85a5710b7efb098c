"""Find where the rows of a text part (csv, tsv, jsonl, and their .gz) start, in one streaming pass.

`text_index` cuts a part into shards at these decompressed byte offsets, so they must be the row boundaries pyarrow's
parsers see (img2dataset reads with pyarrow's defaults), found without holding the part in memory: chunks of about
1 MB, vectorised with numpy. The rules followed are on `RowScanner`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from laion_vq.shards.schema import SchemaError

#: Bytes read (decompressed) per step of the scan: large enough for numpy to pay off, small enough that the
#: per-chunk temporaries stay in cache (measured faster than 8 MB) and memory stays bounded.
CHUNK_BYTES = 1 << 20
#: A row longer than this is almost surely an unterminated quote swallowing the file: stop rather than hold it all.
MAX_ROW_BYTES = 64 << 20

_QUOTE, _LF, _CR = ord('"'), ord("\n"), ord("\r")
_OPEN_BRACE, _CLOSE_BRACE = ord("{"), ord("}")


class TextFormatError(SchemaError):
    """A text part whose rows cannot be cut exactly as pyarrow would read them."""


def open_stream(fs: Any, path: str, input_format: str) -> BinaryIO:
    """The part as a stream of decompressed bytes: a `.gz` format is gunzipped on the fly."""
    return fs.open(path, "rb", compression="gzip" if input_format.endswith(".gz") else None)


class RowScanner:
    """Streams a text part and yields the decompressed offsets of its row starts, chunk by chunk.

    Row boundaries are found exactly as pyarrow's parsers find them:

    - csv/tsv: `"` quoting that opens only at the start of a field (a quoted field may hold the delimiter, line
      breaks and doubled quotes `""`; a quote anywhere else is a literal character, e.g. `5" tall` in a TSV caption),
      line ends `\\n`, `\\r\\n` or a bare `\\r`, empty lines skipped, a last line with or without a line end.
    - jsonl: one object per line, blank (whitespace-only) lines skipped; a line that is not a whole object (an
      object spread over several lines) cannot be cut exactly and is a `TextFormatError`.

    Line ends and quotes come from `flatnonzero`, quoted regions from quote parity, which is exact when every quote
    is either an opening quote at a field start, a closing quote before a delimiter or line end, or half of a doubled
    quote (checked, vectorised, per chunk). A chunk that fails the check (a literal quote inside an unquoted field)
    is walked quote by quote with pyarrow's own state machine.

    Each buffer handed to `_split` starts at a row start (quote state clean); the bytes after its last row end
    are carried into the next buffer, so no state crosses a chunk boundary.
    """

    def __init__(self, url: str, jsonl: bool, delimiter: str, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.url = url
        self.jsonl = jsonl
        self.delimiter = ord(delimiter)
        self.chunk_bytes = chunk_bytes
        self.total = 0
        self.quoted_line_breaks = False

    def rows(self, stream: BinaryIO) -> Iterator[tuple[np.ndarray, memoryview]]:
        """(absolute row starts, the bytes of the complete rows) per buffer; `total` is the stream length after."""
        base, tail = 0, b""
        while True:
            chunk = stream.read(self.chunk_bytes)
            final = not chunk
            buf = tail + chunk if tail else chunk
            if not buf:
                break
            starts, cut = self._split_jsonl(buf, final, base) if self.jsonl else self._split_csv(buf, final)
            yield starts + base, memoryview(buf)[:cut]
            base += cut
            tail = buf[cut:]
            if final:
                break
            if len(tail) > MAX_ROW_BYTES:
                raise TextFormatError(
                    f"{self.url}: no row end in {len(tail)} bytes from byte {base}; a quote opened at a field start "
                    f"and never closed would make pyarrow read the rest of the file as one field"
                )
        self.total = base

    @staticmethod
    def _segments(buf_len: int, ends: np.ndarray, final: bool) -> tuple[np.ndarray, np.ndarray, int]:
        """Line segments [start, end) between the line ends `ends`; the unfinished last one only when `final`."""
        starts = np.empty(len(ends), dtype=np.int64)
        if len(ends):
            starts[0] = 0
            starts[1:] = ends[:-1] + 1
        cut = int(ends[-1]) + 1 if len(ends) else 0
        if final and cut < buf_len:
            starts = np.append(starts, cut)
            ends = np.append(ends, buf_len)
            cut = buf_len
        return starts, ends, cut

    def _split_csv(self, buf: bytes, final: bool) -> tuple[np.ndarray, int]:
        arr = np.frombuffer(buf, dtype=np.uint8)
        is_end = arr == _LF
        if buf.find(b"\r") >= 0:
            is_end |= arr == _CR
        line_ends = np.flatnonzero(is_end)
        if buf.find(b'"') >= 0:
            quotes = np.flatnonzero(arr == _QUOTE)
            if self._parity_is_exact(arr, quotes):
                inside = (np.searchsorted(quotes, line_ends) & 1).astype(bool)
            else:
                inside = self._inside_quotes_exact(buf, quotes, line_ends, final)
            if inside.any():
                outside = line_ends[~inside]
                cut = int(outside[-1]) + 1 if len(outside) else 0
                # a line break in a quoted field of a complete row (the carried tail is scanned again)
                if final or inside[line_ends < cut].any():
                    self.quoted_line_breaks = True
                line_ends = outside
        starts, ends, cut = self._segments(len(arr), line_ends, final)
        return starts[ends > starts], cut

    def _parity_is_exact(self, arr: np.ndarray, quotes: np.ndarray) -> bool:
        """Whether toggling on every quote gives pyarrow's quoting.

        True when every even-numbered quote opens a field (at a field start, or right after a quote: a doubled
        `""`) and every odd-numbered one closes it (before a delimiter, a line end, a quote, or on the buffer's last
        byte: the end of the file, or a tail that is scanned again).
        """
        n = len(arr)
        separators = np.array([self.delimiter, _LF, _CR, _QUOTE], dtype=np.uint8)
        openers, closers = quotes[0::2], quotes[1::2]
        before = arr[np.maximum(openers - 1, 0)]
        if not ((openers == 0) | np.isin(before, separators)).all():
            return False
        after = arr[np.minimum(closers + 1, n - 1)]
        return bool(((closers == n - 1) | np.isin(after, separators)).all())

    def _inside_quotes_exact(self, buf: bytes, quotes: np.ndarray, line_ends: np.ndarray, final: bool) -> np.ndarray:
        """pyarrow's quoting state machine, walked quote by quote (only chunks with a literal quote come here).

        A quote opens a quoted field only at a field start; inside, `""` is a literal quote and a single `"` closes
        it (the field then continues unquoted, where quotes are literal). A field still open at the end of the
        buffer runs past it: the whole row stays in the tail and is scanned again with more bytes.
        """
        n = len(buf)
        positions = quotes.tolist()
        count = len(positions)
        span_starts: list[int] = []
        span_ends: list[int] = []
        i = 0
        while i < count:
            p = positions[i]
            if p == 0 or buf[p - 1] in (self.delimiter, _LF, _CR):
                j = i + 1
                while j + 1 < count and positions[j + 1] == positions[j] + 1:
                    j += 2  # `""` inside a quoted field: a literal quote
                close = positions[j] if j < count else n
                if close == n - 1 and not final:
                    close = n  # the next buffer may start with `"`, making this a doubled quote: undecided
                span_starts.append(p)
                span_ends.append(close)
                i = j + 1
            else:
                i += 1  # a literal quote inside an unquoted field
        if not span_starts:
            return np.zeros(len(line_ends), dtype=bool)
        s = np.asarray(span_starts, dtype=np.int64)
        e = np.asarray(span_ends, dtype=np.int64)
        k = np.searchsorted(s, line_ends) - 1
        return (k >= 0) & (line_ends < e[np.maximum(k, 0)])

    def _split_jsonl(self, buf: bytes, final: bool, base: int) -> tuple[np.ndarray, int]:
        arr = np.frombuffer(buf, dtype=np.uint8)
        is_end = arr == _LF
        if buf.find(b"\r") >= 0:
            is_end |= arr == _CR  # JSON strings cannot hold a raw CR or LF, so both end a line
        starts, ends, cut = self._segments(len(arr), np.flatnonzero(is_end), final)
        nonempty = ends > starts
        starts, ends = starts[nonempty], ends[nonempty]
        if not len(starts):
            return starts, cut
        whole = (arr[starts] == _OPEN_BRACE) & (arr[ends - 1] == _CLOSE_BRACE)
        if whole.all():
            return starts, cut
        keep = whole.copy()
        for i in np.flatnonzero(~whole).tolist():
            line = buf[starts[i] : ends[i]].strip(b" \t")
            if not line:
                continue  # a blank line: pyarrow skips it
            if line[:1] == b"{" and line[-1:] == b"}":
                keep[i] = True
                continue
            raise TextFormatError(
                f"{self.url}: the line at byte {base + int(starts[i])} is not one whole JSON object "
                f"({bytes(line[:60])!r}…); jsonl needs one object per line to be cut into shards"
            )
        return starts[keep], cut

"""A full disk (ENOSPC) or a used-up quota (EDQUOT), said clearly. Every local write of the platform (publishing,
the download scratch folder, the encoder's parquet, removal rewrites) runs inside `disk_full_as_error`: the one
place an OSError with either errno becomes a DiskFullError naming the file, the bytes it needed and the bytes
free. Writers clean up their temp files before the error leaves them, so the free bytes reported are what is
really free.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator

#: the errnos of "nothing more fits": the filesystem is full, or this user's quota is used up
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
CHECKED_BEFORE_WRITING = "checked before writing"


def _bytes(n: int | None) -> str:
    return "an unknown number of bytes" if n is None else f"{n:,} bytes ({n / 1e6:,.1f} MB)"


class DiskFullError(OSError):
    """A local write that did not fit: `path` (what was being written), `needed` (its bytes, None when not known
    before writing), `free` (bytes free on that filesystem afterwards, `shutil.disk_usage`), `staging` and
    `staging_free` (a local folder the bytes went through first, when it is another filesystem). An OSError with
    the original errno, so code catching OSError still catches it; never retried blindly: space must be freed."""

    def __init__(
        self,
        path: str,
        needed: int | None,
        free: int | None,
        code: int = errno.ENOSPC,
        detail: str = "",
        staging: str | None = None,
        staging_free: int | None = None,
    ) -> None:
        self.path, self.needed, self.free, self.detail = path, needed, free, detail
        self.staging, self.staging_free = staging, staging_free
        super().__init__(code, os.strerror(code), path)

    def __reduce__(self) -> tuple:  # picklable across processes (Celery, multiprocessing) with its fields
        fields = (self.path, self.needed, self.free, self.errno, self.detail, self.staging, self.staging_free)
        return type(self), fields

    def __str__(self) -> str:
        what = "disk quota exceeded" if self.errno == errno.EDQUOT else "disk full"
        free = "free space unknown" if self.free is None else f"{_bytes(self.free)} free on its filesystem"
        through = ""
        if self.staging is not None:
            staged = "free space unknown" if self.staging_free is None else f"{_bytes(self.staging_free)} free"
            through = f"; written first under {self.staging}: {staged} there"
        quota = " (a quota can be lower than the free space)" if self.errno == errno.EDQUOT else ""
        cause = f" [{self.detail}]" if self.detail else ""
        return (
            f"{what} writing {self.path}: it needs {_bytes(self.needed)}, {free}{quota}{through}. Nothing partial "
            f"was left and any older file there is unchanged; free space (or point the writes elsewhere) and re-run"
            f"{self._elsewhere()}{cause}"
        )

    def _elsewhere(self) -> str:
        """A hint when the named filesystem has room: the write that failed was maybe on another disk (a print()
        into Dagster's captured stdout under a full $DAGSTER_HOME/storage fails with the same errno)."""
        frees = [f for f in (self.free, self.staging_free) if f is not None]
        roomy = max(frees, default=0) >= max(self.needed or 0, 64 << 20)
        if self.free is None or not roomy or self.detail == CHECKED_BEFORE_WRITING:
            return ""
        return (
            ". That filesystem has room now: if nothing else freed it, the full disk is another one this step writes "
            "to (the cause below names it; Dagster's captured stdout goes to $DAGSTER_HOME/storage)"
        )


def _existing(path: str) -> str:
    """`path` or its nearest existing parent folder: where the filesystem holding it can be asked."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem that holds (or would hold) `path` (`shutil.disk_usage`); None if unknown."""
    try:
        return int(shutil.disk_usage(_existing(path)).free)
    except OSError:
        return None


def _writable_bytes(path: str) -> int | None:
    """Bytes this process can still write there: root may also use the blocks ext4 reserves for it."""
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return None
    return int((st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize)


def require_free_space(path: str, needed: int) -> None:
    """Fail before writing, with DiskFullError, when `needed` bytes (known in advance: a copy) cannot fit on the
    filesystem of local `path`; a write that might fit is left to try (the write still translates ENOSPC)."""
    writable = _writable_bytes(path)
    if writable is not None and needed > writable:
        raise DiskFullError(path, needed, free_bytes(path), detail=CHECKED_BEFORE_WRITING)


def _same_filesystem(a: str, b: str) -> bool:
    try:
        return os.stat(_existing(a)).st_dev == os.stat(_existing(b)).st_dev
    except OSError:
        return True


@contextlib.contextmanager
def disk_full_as_error(path: str, needed: int | None = None, staging: str | None = None) -> Iterator[None]:
    """Inside: an OSError with ENOSPC/EDQUOT becomes DiskFullError(path, needed, free bytes). `path` is what the
    block writes (named in the error, and where free space is measured); `staging` a local folder the bytes pass
    through first (the encoder's temp parquet), reported too when it is another filesystem. A DiskFullError
    raised deeper (naming a more precise file) passes through unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        if staging is not None and _same_filesystem(path, staging):
            staging = None
        raise DiskFullError(
            path,
            needed,
            free_bytes(path),
            err.errno,
            detail=str(err),
            staging=staging,
            staging_free=None if staging is None else free_bytes(staging),
        ) from err

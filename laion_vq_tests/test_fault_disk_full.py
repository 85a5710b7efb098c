"""A full disk, met for real: a few-MB tmpfs mounted under the test's folder and filled, so every write on it
gets the kernel's ENOSPC (errno 28). Mounting needs root (CI runs as root); without it the tests fail saying so.

What must hold, for publishing and for a real stage (img2dataset on the loopback image server):
- the error is a DiskFullError naming the file being written, the bytes it needed (when known) and the bytes free;
- no temp file (`storage.TMP_MARKER`), no scratch folder, no partial shard is left, and the files stored before are
  byte for byte what they were;
- once space is freed, the same call succeeds.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion_vq.download import DownloadOptions
from laion_vq.shards import storage
from laion_vq.shards.disk_full import DiskFullError
from laion_vq.shards.storage import TMP_MARKER, StorageLayout, publish_bytes, publish_file
from laion_vq.stages import SCRATCH_PREFIX, download_image_shard
from laion_vq.testing.image_server import ImageServer
from laion_vq.testing.synthetic_metadata import laion_table

DISK_MB = 4
SAMPLES = 100
FAST = DownloadOptions(timeout=5, thread_count=4)


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A DISK_MB tmpfs mounted at tmp_path/disk (unmounted afterwards, whatever happened)."""
    if os.geteuid() != 0:
        pytest.fail(
            "this test mounts a small tmpfs to fill it for real (a true ENOSPC) and needs root for `mount`; "
            "run the suite as root (CI does), or deselect laion_vq_tests/test_fault_disk_full.py",
            pytrace=False,
        )
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0755", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(f"`mount -t tmpfs` failed (root without CAP_SYS_ADMIN?): {mounted.stderr.strip()}", pytrace=False)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A filler file taking all but `leave` bytes of the disk's free space; delete it to free the space."""
    filler = disk / "filler.bin"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def _temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if TMP_MARKER in p.name]


@pytest.mark.parametrize("when", ["checked before writing", "mid-write"])
def test_publish_on_a_full_disk_names_the_file_and_sizes_and_keeps_the_old_file(
    tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    dest = small_disk / "images" / "00000.tar"
    publish_bytes(b"the older, complete file", str(dest))
    _fill(small_disk, leave=512 << 10)
    source = tmp_path / "new.tar"  # on the big disk: only the destination is full
    source.write_bytes(os.urandom(1 << 20))
    if when == "mid-write":  # no check before copying: the copy itself runs into the kernel's ENOSPC
        monkeypatch.setattr(storage, "require_free_space", lambda path, needed: None)

    with pytest.raises(DiskFullError) as raised:
        publish_file(str(source), str(dest))
    err = raised.value
    free = shutil.disk_usage(small_disk).free
    assert err.errno == errno.ENOSPC and err.path == str(dest) and err.needed == 1 << 20
    assert err.free is not None and abs(err.free - free) <= 64 << 10  # measured after the temp file went
    message = str(err)
    assert f"disk full writing {dest}" in message and f"needs {1 << 20:,} bytes" in message
    assert f"{err.free:,} bytes" in message and "free on its filesystem" in message
    assert ("checked before writing" in message) == (when == "checked before writing")
    assert isinstance(err.__cause__, OSError) == (when == "mid-write")
    assert _temp_files(small_disk) == []
    assert dest.read_bytes() == b"the older, complete file"

    # the same write of bytes (no source file): the same error, nothing left
    with pytest.raises(DiskFullError, match=f"disk full writing {dest}"):
        publish_bytes(source.read_bytes(), str(dest))
    assert _temp_files(small_disk) == [] and dest.read_bytes() == b"the older, complete file"

    (small_disk / "filler.bin").unlink()
    assert publish_file(str(source), str(dest)) == 1 << 20
    assert dest.read_bytes() == source.read_bytes() and _temp_files(small_disk) == []


def _shard_files(layout: StorageLayout) -> dict[str, bytes]:
    paths = (layout.image_tar(0), layout.image_status(0), layout.image_stats(0))
    return {p: Path(p).read_bytes() for p in paths if Path(p).exists()}


def _scratch_folders(root: str) -> list[str]:
    return [name for name in os.listdir(root) if name.startswith((SCRATCH_PREFIX, "laion_vq_shard_"))]


def test_download_stage_on_a_full_storage_disk_then_after_space_is_freed(small_disk: Path) -> None:
    """The storage root on the small disk: a re-download that cannot fit publishes nothing (not the tar without
    its status parquet) and the stored shard stays; with room again the same call succeeds."""
    layout = StorageLayout(str(small_disk / "data"))
    with ImageServer() as server:
        urls = [server.url(p) for p in ImageServer.photo_paths()]
        os.makedirs(layout.metadata_dir())
        pq.write_table(laion_table(urls), layout.metadata_shard(0))
        first = download_image_shard(layout, 0, SAMPLES, FAST)
        assert first.successes == len(urls)
        stored = _shard_files(layout)
        scratch_before = _scratch_folders(tempfile.gettempdir())  # other processes' too: only ours must go
        filler = _fill(small_disk, leave=first.bytes_tar // 2)

        with pytest.raises(DiskFullError) as raised:
            download_image_shard(layout, 0, SAMPLES, FAST)
        message = str(raised.value)
        assert f"disk full writing {layout.image_tar(0)}" in message, message
        assert raised.value.needed is not None and raised.value.needed > first.bytes_tar
        assert f"{raised.value.needed:,} bytes" in message
        assert _shard_files(layout) == stored  # byte for byte, all three
        assert _temp_files(small_disk) == [] and _scratch_folders(tempfile.gettempdir()) == scratch_before

        filler.unlink()
        again = download_image_shard(layout, 0, SAMPLES, FAST)
        assert again.successes == len(urls) and _temp_files(small_disk) == []
        assert set(_shard_files(layout)) == set(stored)


def test_download_stage_with_a_full_scratch_disk_then_after_space_is_freed(
    tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's scratch folder (tempfile's) on the small disk: img2dataset's own tar writes hit ENOSPC (it
    swallows a sample's write error and goes on): the stage raises DiskFullError naming the scratch tar, not a
    shard with missing rows; nothing is published, no scratch is left; with room again the same call succeeds."""
    scratch_root = small_disk / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    layout = StorageLayout(str(tmp_path / "data"))  # storage has room
    with ImageServer() as server:
        urls = [server.url(p) for p in ImageServer.photo_paths()]
        os.makedirs(layout.metadata_dir())
        pq.write_table(laion_table(urls), layout.metadata_shard(0))
        filler = _fill(small_disk, leave=64 << 10)  # the status parquet fits, not the tar's images

        with pytest.raises(DiskFullError) as raised:
            download_image_shard(layout, 0, SAMPLES, FAST)
        err = raised.value
        assert err.path.startswith(str(scratch_root)) and err.path.endswith("00000.tar"), str(err)
        assert f"disk full writing {err.path}" in str(err) and "free on its filesystem" in str(err)
        assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
        assert _scratch_folders(str(scratch_root)) == []
        assert _shard_files(layout) == {} and _temp_files(tmp_path) == []

        filler.unlink()
        done = download_image_shard(layout, 0, SAMPLES, FAST)
        assert done.successes == len(urls) and set(_shard_files(layout)) == {
            layout.image_tar(0),
            layout.image_status(0),
            layout.image_stats(0),
        }
        assert _scratch_folders(str(scratch_root)) == []

"""The system calls of the writer: positioned writes, writeback control, kernel copies, reflinks and hard
links of unchanged shards, and the output files they go to."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import RlexportError
from .layout import Shard, header_bytes

try:
    import fcntl
except ImportError:
    fcntl = None

log = logging.getLogger("rlexport")
_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
COPY_BUFFER = 16 << 20  # where copy_file_range cannot copy: through a buffer this big


def _libc_sync_file_range():
    try:
        import ctypes
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        return fn
    except (OSError, AttributeError):
        return None


_sync_file_range = _libc_sync_file_range()


def start_writeback(fd: int, offset: int, n: int) -> None:
    """Start writing the range to disk now (async), so the fsync at the end has only the tail left."""
    if _sync_file_range is not None and n:
        _sync_file_range(fd, offset, n, _SYNC_FILE_RANGE_WRITE)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def copy_range(src: Path, src_off: int, fd: int, dst_off: int, n: int) -> None:
    """Bytes of an unchanged tensor, copied by the kernel (no decode, no user-space buffer)."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < n:
            try:
                k = os.copy_file_range(sfd, fd, n - done, src_off + done, dst_off + done)
            except OSError:  # EXDEV, ENOSYS, EINVAL on some filesystems: copy through a buffer
                k = 0
            if k <= 0:
                buf = bytearray(min(n - done, COPY_BUFFER))
                view = memoryview(buf)
                while done < n:
                    m = os.preadv(sfd, [view[:min(len(view), n - done)]], src_off + done)
                    if m <= 0:
                        raise RlexportError("corrupt-safetensors", "file is shorter than its header says",
                                            file=src, hint="copy it again from the training machine")
                    pwrite_all(fd, view[:m], dst_off + done)
                    done += m
                break
            done += k
    finally:
        os.close(sfd)


class OutFile:
    def __init__(self, path: Path, shard: Shard):
        self.path, self.shard = path, shard
        header = header_bytes(shard.refs)
        self.data_start = len(header)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        pwrite_all(self.fd, memoryview(header), 0)

    def finish(self, drop: bool = False) -> None:
        os.fsync(self.fd)
        if drop:
            drop_cached(self.fd, 0, 0)
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def drop_cached(fd: int, offset: int, n: int) -> None:
    """Wait until the range is on disk, then let the kernel drop it from the page cache."""
    if _sync_file_range is not None and n:
        _sync_file_range(fd, offset, n, _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE |
                         _SYNC_FILE_RANGE_WAIT_AFTER)
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


class PlacedFile:
    """A shard that is an input file unchanged: hard-linked (link="hard"), reflinked, or copied whole by the
    kernel; its tensors' checks (NaN/Inf) still read every byte."""

    def __init__(self, path: Path, shard: Shard, link: str):
        self.path, self.shard, self.fd = path, shard, None
        self.how = None
        if link == "hard":
            try:
                os.link(shard.source, path)
                self.how = "hard link"
            except OSError:
                pass
        if self.how is None:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            if reflink(shard.source, self.fd):
                self.how = "reflink"
        self.size = os.stat(shard.source).st_size
        log.info("%s: %s of %s", path.name, self.how or "copy", shard.source)

    @property
    def copies(self) -> bool:
        return self.how is None

    def finish(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def reflink(src: Path, dst_fd: int) -> bool:
    if fcntl is None:
        return False
    try:
        sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(dst_fd, 0x40049409, sfd)  # FICLONE: share the extents, copy on write (btrfs, xfs, ...)
        return True
    except OSError:
        return False
    finally:
        os.close(sfd)

"""Streaming, atomic writer of sharded safetensors folders.

The safetensors library only writes whole in-memory dicts; to keep memory at one tensor we lay the shards
out from the TensorRefs' dtype and shape (known before any byte is read), write each header, then stream the
tensors' bytes in the same order. The layout is the library's format: u64 header length, JSON header padded
with spaces to 8 bytes, then the data.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import threading
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import RlexportError
from .stream import Scratch, StreamLoader, as_bytes, block_shape, n_rows, row_numel
from .tensors import ST_NAMES, TensorRef

try:
    import fcntl
except ImportError:  # not POSIX: exports to one --out are not serialized
    fcntl = None

TMP_MARK = ".rlexport-tmp-"
LOCK_MARK = ".rlexport-lock"
log = logging.getLogger("rlexport")


@dataclass(frozen=True)
class Shard:
    filename: str
    refs: tuple[TensorRef, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.refs)


def plan_shards(refs: list[TensorRef], max_shard_bytes: int) -> list[Shard]:
    """Split in order; a new shard starts when the next tensor would cross the limit (never empty)."""
    names = set()
    groups: list[list[TensorRef]] = [[]]
    size = 0
    for ref in refs:
        if ref.name in names:
            raise RlexportError("duplicate-tensor", f"two tensors would be written as '{ref.name}'",
                                file=ref.origin, hint="the checkpoint holds the same weight twice; remove one")
        names.add(ref.name)
        if groups[-1] and size + ref.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(ref)
        size += ref.nbytes
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


def _header(refs: tuple[TensorRef, ...]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for r in refs:
        header[r.name] = {"dtype": ST_NAMES[r.dtype], "shape": list(r.shape),
                          "data_offsets": [offset, offset + r.nbytes]}
        offset += r.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _bytes_of(t: torch.Tensor, ref: TensorRef) -> memoryview:
    if t.dtype != ref.dtype or tuple(t.shape) != tuple(ref.shape):
        raise AssertionError(f"{ref.name}: produced {t.dtype}{list(t.shape)}, planned {ref.dtype}{list(ref.shape)}")
    return as_bytes(t)


# ---- the shard pipeline ----
# Each tensor becomes jobs of at most BLOCK_BYTES output bytes (rows of it, for streamable loads); worker threads
# read, merge, cast, check and pwrite blocks at offsets fixed by the header, so reads, compute and writes of
# different blocks overlap (torch and the os calls release the GIL). At most `workers + 2` jobs are in flight:
# memory is bounded by workers x (largest block and its float32 intermediate), whatever the model size.
BLOCK_BYTES = 16 << 20
SUB_BLOCK_BYTES = 384 << 10  # output bytes per compute step: with its float32 intermediates, fits a 1 MiB L2
COPY_BYTES = 64 << 20     # byte-range copies (copy_file_range) need no buffer: bigger steps
_SYNC_FILE_RANGE_WRITE = 2


def default_workers() -> int:
    """The cores for compute plus two threads that keep the disk busy while they compute."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores + 2


def _libc_sync_file_range():
    try:
        import ctypes
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        return fn
    except (OSError, AttributeError):
        return None


_sync_file_range = _libc_sync_file_range()


def _start_writeback(fd: int, offset: int, n: int) -> None:
    """Start writing the range to disk now (async), so the fsync at the end has only the tail left."""
    if _sync_file_range is not None and n:
        _sync_file_range(fd, offset, n, _SYNC_FILE_RANGE_WRITE)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _copy_range(src: Path, src_off: int, fd: int, dst_off: int, n: int) -> None:
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
                buf = bytearray(min(n - done, BLOCK_BYTES))
                view = memoryview(buf)
                while done < n:
                    m = os.preadv(sfd, [view[:min(len(view), n - done)]], src_off + done)
                    if m <= 0:
                        raise RlexportError("corrupt-safetensors", "file is shorter than its header says",
                                            file=src, hint="copy it again from the training machine")
                    _pwrite_all(fd, view[:m], dst_off + done)
                    done += m
                break
            done += k
    finally:
        os.close(sfd)


class _Opened:
    """A StreamLoader opened by the first worker that needs it (adapter factors load once per tensor) and closed
    when its last block is written (file handles and factors are released tensor by tensor)."""

    def __init__(self, loader: StreamLoader, blocks: int):
        self.loader, self.rows_obj, self.lock, self.left = loader, None, threading.Lock(), blocks

    def get(self):
        with self.lock:
            if self.rows_obj is None:
                self.rows_obj = self.loader.open()
            return self.rows_obj

    def done(self) -> None:
        with self.lock:
            self.left -= 1
            if self.left == 0 and self.rows_obj is not None:
                self.rows_obj.close()
                self.rows_obj = None


class _Out:
    def __init__(self, path: Path, shard: Shard):
        self.path, self.shard = path, shard
        header = _header(shard.refs)
        self.data_start = len(header)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        _pwrite_all(self.fd, memoryview(header), 0)

    def finish(self) -> None:
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def _jobs(out: _Out, local: threading.local):
    """(callable, nbytes) for every block of the shard, in file order."""
    offset = out.data_start
    for ref in out.shard.refs:
        load = ref.load
        if isinstance(load, StreamLoader):
            if load.dtype != ref.dtype or tuple(load.shape) != tuple(ref.shape):
                raise AssertionError(f"{ref.name}: load gives {load.dtype}{list(load.shape)}, planned "
                                     f"{ref.dtype}{list(ref.shape)}")
        rng = load.byte_range if isinstance(load, StreamLoader) else None
        if rng is not None and ref.nbytes:
            src, src_off, _ = rng
            for i in range(0, ref.nbytes, COPY_BYTES):
                n = min(COPY_BYTES, ref.nbytes - i)
                yield partial(_copy_job, src, src_off + i, out, offset + i, n), n
        elif isinstance(load, StreamLoader) and load.streamable and ref.numel:
            row_bytes = row_numel(ref.shape) * ref.dtype.itemsize
            step = max(1, BLOCK_BYTES // max(1, row_bytes))
            total = n_rows(ref.shape)
            opened = _Opened(load, -(-total // step))
            for s in range(0, total, step):
                e = min(total, s + step)
                yield partial(_rows_job, ref, opened, s, e, out, offset + s * row_bytes, local), (e - s) * row_bytes
        else:
            yield partial(_whole_job, ref, out, offset), ref.nbytes
        offset += ref.nbytes


def _copy_job(src: Path, src_off: int, out: _Out, dst_off: int, n: int) -> int:
    _copy_range(src, src_off, out.fd, dst_off, n)
    _start_writeback(out.fd, dst_off, n)
    return n


def _rows_job(ref: TensorRef, opened: _Opened, start: int, stop: int, out: _Out, dst_off: int,
              local: threading.local) -> int:
    """One block, computed in sub-blocks small enough that every stage (read, convert, merge, check, cast) works
    in the core's cache: streaming whole 16 MB blocks through each stage in turn is memory-bound and ~2x slower."""
    scratch = getattr(local, "scratch", None)
    if scratch is None:
        scratch = local.scratch = Scratch()
    try:
        rows = opened.get()
        row_bytes = row_numel(ref.shape) * ref.dtype.itemsize
        step = max(1, SUB_BLOCK_BYTES // max(1, row_bytes))
        off = dst_off
        for s in range(start, stop, step):
            e = min(stop, s + step)
            scratch.reset()
            t = rows.rows(s, e, scratch)
            if t.dtype != ref.dtype or tuple(t.shape) != block_shape(ref.shape, s, e):
                raise AssertionError(f"{ref.name}[{s}:{e}]: produced {t.dtype}{list(t.shape)}, planned {ref.dtype}")
            data = as_bytes(t)
            _pwrite_all(out.fd, data, off)
            off += len(data)
    finally:
        opened.done()
    _start_writeback(out.fd, dst_off, off - dst_off)
    return off - dst_off


def _whole_job(ref: TensorRef, out: _Out, dst_off: int) -> int:
    data = _bytes_of(ref.load(), ref)
    _pwrite_all(out.fd, data, dst_off)
    _start_writeback(out.fd, dst_off, len(data))
    return len(data)


@contextmanager
def _one_torch_thread_each():
    """Workers run torch single-threaded: parallelism comes from the workers, not from OpenMP teams that would
    oversubscribe the cores (and spin) next to the I/O threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def write_shards(items: list[tuple[Path, Shard]], on_bytes: Callable[[int], None] | None = None, *,
                 workers: int | None = None) -> None:
    """Write the shards (path, Shard) with a bounded pipeline of threads; each file is fsynced once, when its
    last block is written (while the next shard's blocks go on). `on_bytes` is called from this thread."""
    workers = max(1, workers or default_workers())
    window = workers + 2
    local = threading.local()
    outs: list[_Out] = []
    with _one_torch_thread_each(), ThreadPoolExecutor(workers, thread_name_prefix="rlexport-write") as pool:
        inflight: deque = deque()
        finishing: list[Future] = []
        try:
            for path, shard in items:
                out = _Out(path, shard)
                outs.append(out)
                jobs = _jobs(out, local)
                for job, _ in jobs:
                    while len(inflight) >= window:
                        _settle(inflight.popleft(), on_bytes)
                    inflight.append(pool.submit(job))
                # every block of this shard is queued; fsync it once the last one is written
                while inflight:
                    _settle(inflight.popleft(), on_bytes)
                finishing.append(pool.submit(out.finish))
            for f in finishing:
                f.result()
        except BaseException:
            for f in inflight:
                f.cancel()
            for f in [*inflight, *finishing]:
                try:
                    f.result()
                except BaseException:
                    pass
            raise
        finally:
            for out in outs:
                out.close()


def _settle(fut: Future, on_bytes: Callable[[int], None] | None) -> None:
    n = fut.result()
    if on_bytes:
        on_bytes(n)


def write_shard(path: Path, shard: Shard, on_bytes: Callable[[int], None] | None = None) -> None:
    write_shards([(path, shard)], on_bytes)


def write_index(folder: Path, shards: list[Shard]) -> None:
    # Always an index, even for one shard: vLLM then loads only the files it names.
    index = {"metadata": {"total_size": sum(s.nbytes for s in shards)},
             "weight_map": {r.name: s.filename for s in shards for r in s.refs}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- signals: the few steps that must not be cut in half ----
# The CLI turns SIGINT/SIGTERM into KeyboardInterrupt, except inside these sections, where it only records the
# signal: the renames of a commit (stopping between them would hide the old export and not show the new one)
# and the removal of a temporary folder after a failure (an exception is already on its way out).
_critical = 0
deferred_signals: list[int] = []


@contextmanager
def uninterruptible():
    global _critical
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1


def in_uninterruptible() -> bool:
    return _critical > 0


class OutLock:
    """One export at a time per --out: an flock on `.<out>.rlexport-lock` beside it, taken without waiting.

    The lock file is removed on release; a lock taken on a file that was removed meanwhile is retried, so two
    processes never both hold it. The kernel drops the lock of a killed process."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}{LOCK_MARK}"
        self.fd: int | None = None

    def __enter__(self) -> "OutLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise output_error(self.out, e) from None
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    who = f" (pid {holder})" if holder.isdigit() else ""
                    raise RlexportError("out-locked", f"another export{who} is writing this output folder now",
                                        file=self.out, hint="wait for it to finish, or choose another --out") from None
                log.warning("cannot lock %s (%s): concurrent exports to it are not detected", self.path, e.strerror)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                break
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder before us removed the file after we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still holding it (see the class doc)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def remove_stale(out: Path) -> list[Path]:
    """Remove what killed exports to `out` left (call it holding OutLock(out): then nothing else is writing)."""
    removed = []
    for p in stale_temporaries(out):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        log.warning("removed %s: the unfinished export of an interrupted run (the output was never touched)", p)
    return removed


def output_error(out: Path, e: OSError) -> RlexportError:
    """An OSError met while writing the export, as the error the user can act on."""
    where = e.filename if isinstance(e.filename, str) else out
    if where is not out and not os.path.abspath(where).startswith(os.path.join(os.path.abspath(out.parent), "")):
        return RlexportError("unreadable-file", f"cannot read: {e.strerror or e}", file=where,
                             hint="check the file and its permissions")  # an input copied into the export
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return RlexportError("disk-full", f"the output disk is full or the file size limit was hit ({e.strerror})",
                             file=where, hint="free space (the export needs about the size of the model) or "
                                              "choose an --out on another disk; nothing was written")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RlexportError("out-unwritable", f"cannot write: {e.strerror}", file=where,
                             hint="choose an --out in a folder you can write to")
    return RlexportError("write-failed", f"could not write the export: {e.strerror or e}", file=where,
                         hint="check the output disk; nothing was written")


class AtomicFolder:
    """Write into a hidden temporary folder beside `out`, then rename it into place in one step.

    Holds OutLock(out) throughout, and removes the temporaries of killed exports to `out` first. On any exception
    (Ctrl-C included) the temporary folder, the lock and any parent folders it created are removed and `out` is
    untouched; OSErrors (disk full...) become RlexportErrors.
    """

    def __init__(self, out: Path, *, force: bool):
        self.out = out
        self.force = force
        self.tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lock = OutLock(out)
        self.made: list[Path] = []  # parents of out this export created, deepest first

    def __enter__(self) -> Path:
        try:
            for p in [self.out.parent, *self.out.parent.parents]:
                if p.exists():
                    break
                self.made.append(p)
            try:
                self.out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise output_error(self.out, e) from None
            self.lock.__enter__()
            remove_stale(self.out)
            try:
                self.tmp.mkdir()
            except OSError as e:
                raise output_error(self.out, e) from None
        except BaseException:
            self._undo()
            raise
        return self.tmp

    def _undo(self) -> None:
        with uninterruptible():
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.lock.__exit__()
            for p in self.made:
                try:
                    p.rmdir()
                except OSError:
                    break

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._undo()
            if isinstance(exc, OSError):
                raise output_error(self.out, exc) from None
            return
        try:
            with uninterruptible():
                self._commit()
        except OSError as e:
            self._undo()
            raise output_error(self.out, e) from None
        except BaseException:
            self._undo()
            raise
        self.lock.__exit__()

    def _commit(self) -> None:
        for p in self.tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(self.tmp)
        old = None
        if self.out.exists():
            if not self.force and any(self.out.iterdir()):
                raise RlexportError("out-exists", "output folder appeared during export", file=self.out,
                                    hint="another export wrote it; pass --force to replace it")
            old = self.out.parent / f".{self.out.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        try:
            os.rename(self.tmp, self.out)
        except OSError as e:
            if old is not None:
                os.rename(old, self.out)
            raise RlexportError("out-exists", f"could not move the export into place ({e.strerror})",
                                file=self.out, hint="another process is writing there; try again") from None
        fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def stale_temporaries(out: Path) -> Iterator[Path]:
    """Temporary folders left by killed exports to the same --out."""
    if out.parent.is_dir():
        yield from (p for p in out.parent.glob(f".{out.name}{TMP_MARK}*") if p.is_dir())

"""Streaming, atomic writer of sharded safetensors folders.

The safetensors library only writes whole in-memory dicts; to keep memory at one tensor we lay the shards
out from the TensorRefs' dtype and shape (known before any byte is read), write each header, then stream the
tensors' bytes in the same order. The layout is the library's format: u64 header length, JSON header padded
with spaces to 8 bytes, then the data.
"""
from __future__ import annotations

import errno
import gc
import json
import logging
import os
import queue
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
    source: Path | None = None  # an input file holding exactly these tensors, unchanged: linked or copied whole

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.refs)


LINK_MODES = ("auto", "hard", "copy")


def plan_shards(refs: list[TensorRef], max_shard_bytes: int, *, link: str = "copy") -> list[Shard]:
    """Split in order; a new shard starts when the next tensor would cross the limit (never empty).

    Unless link="copy", a run of tensors that is exactly an input file's tensors, unchanged (same names, dtypes,
    shapes, bytes), becomes a shard of its own that the writer reflinks, hard-links (link="hard") or copies whole
    instead of streaming it tensor by tensor.
    """
    if link not in LINK_MODES:
        raise ValueError(f"link must be one of {LINK_MODES}")
    names = set()
    for ref in refs:
        if ref.name in names:
            raise RlexportError("duplicate-tensor", f"two tensors would be written as '{ref.name}'",
                                file=ref.origin, hint="the checkpoint holds the same weight twice; remove one")
        names.add(ref.name)
    groups: list[tuple[list[TensorRef], Path | None]] = []
    size = 0
    i = 0
    while i < len(refs):
        n, source = _whole_file_run(refs, i, max_shard_bytes) if link != "copy" else (0, None)
        if n:
            groups.append((list(refs[i:i + n]), source))
            i += n
            continue
        ref = refs[i]
        if not groups or groups[-1][1] is not None or (groups[-1][0] and size + ref.nbytes > max_shard_bytes):
            groups.append(([], None))
            size = 0
        groups[-1][0].append(ref)
        size += ref.nbytes
        i += 1
    if not groups:
        groups = [([], None)]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g), src) for i, (g, src) in enumerate(groups)]


def _stored(ref: TensorRef):
    st = ref.load.stored if isinstance(ref.load, StreamLoader) else None
    if st is None or st.file.name != ref.name or st.file.dtype != ref.dtype or \
            tuple(st.file.shape) != tuple(ref.shape):
        return None
    return st


def _file_tensors(path: Path) -> set[str] | None:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    return {k for k in header if k != "__metadata__"}


def _whole_file_run(refs: list[TensorRef], i: int, max_shard_bytes: int) -> tuple[int, Path | None]:
    first = _stored(refs[i])
    if first is None:
        return 0, None
    path = first.file.path
    names = _file_tensors(path)
    if not names:
        return 0, None
    j, size = i, 0
    while j < len(refs) and j - i < len(names):
        st = _stored(refs[j])
        if st is None or st.file.path != path:
            break
        size += refs[j].nbytes
        j += 1
    if {r.name for r in refs[i:j]} != names or size > max_shard_bytes:
        return 0, None
    return j - i, path


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
SUB_BLOCK_BYTES = 1536 << 10  # output bytes per compute step and pwrite: float32 intermediates stay in L3; bigger
                              # writes hold ext4's inode lock longer (the other writers spin on it)
SUB_MIN_ROWS = 16            # fewer rows make short, slow matrix products (and lora.streamed.MIN_ROWS widens them)
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


class _Placed:
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
            if _reflink(shard.source, self.fd):
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


def _reflink(src: Path, dst_fd: int) -> bool:
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


def _placed_jobs(out: _Placed, local: threading.local):
    data = out.shard.nbytes
    header = out.size - data
    if out.copies:
        for i in range(0, out.size, COPY_BYTES):
            n = min(COPY_BYTES, out.size - i)
            reported = max(0, min(i + n, out.size) - max(i, header))  # progress counts tensor bytes only
            yield partial(_copy_job, out.shard.source, i, out, i, n, reported), reported
    for ref in out.shard.refs:
        st = _stored(ref)
        if st is None:
            raise AssertionError(f"{ref.name}: planned as an unchanged tensor of {out.shard.source}")
        if not st.checks or not ref.numel:
            if not out.copies:
                yield partial(_count, ref.nbytes), ref.nbytes
            continue
        row_bytes = row_numel(ref.shape) * ref.dtype.itemsize
        step = max(1, BLOCK_BYTES // max(1, row_bytes))
        total = n_rows(ref.shape)
        opened = _Opened(st.file, -(-total // step))
        for s in range(0, total, step):
            e = min(total, s + step)
            n = (e - s) * row_bytes
            yield partial(_verify_job, opened, st.checks, s, e, 0 if out.copies else n, local), n


def _count(n: int) -> int:
    return n


def _verify_job(opened: _Opened, checks, start: int, stop: int, reported: int, local: threading.local) -> int:
    scratch = getattr(local, "scratch", None)
    if scratch is None:
        scratch = local.scratch = Scratch()
    scratch.reset()
    try:
        rows = opened.get()
        rows.prefetch(start, stop)
        t = rows.rows(start, stop, scratch)
        for check in checks:
            check(t)
    finally:
        opened.done()
    return reported


def _jobs(out: _Out, local: threading.local, writer: "_Writer"):
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
            subs = _sub_blocks(n_rows(ref.shape), row_bytes)
            per_job = max(1, BLOCK_BYTES // max(1, (subs[0][1] - subs[0][0]) * row_bytes))
            groups = [subs[i:i + per_job] for i in range(0, len(subs), per_job)]
            opened = _Opened(load, len(groups))
            for g in groups:
                s, e = g[0][0], g[-1][1]
                yield (partial(_rows_job, ref, opened, g, out, offset + s * row_bytes, local, writer),
                       (e - s) * row_bytes)
        else:
            yield partial(_whole_job, ref, out, offset), ref.nbytes
        offset += ref.nbytes


def _copy_job(src: Path, src_off: int, out, dst_off: int, n: int, reported: int | None = None) -> int:
    _copy_range(src, src_off, out.fd, dst_off, n)
    _start_writeback(out.fd, dst_off, n)
    return n if reported is None else reported


def _sub_blocks(total: int, row_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of ~SUB_BLOCK_BYTES, never shorter than SUB_MIN_ROWS (a short tail joins the range before)."""
    step = max(SUB_MIN_ROWS, SUB_BLOCK_BYTES // max(1, row_bytes))
    out = [(s, min(total, s + step)) for s in range(0, total, step)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < SUB_MIN_ROWS:
        out[-2:] = [(out[-2][0], out[-1][1])]
    return out


def _rows_job(ref: TensorRef, opened: _Opened, subs: list[tuple[int, int]], out: _Out, dst_off: int,
              local: threading.local, writer: "_Writer") -> int:
    """One block, computed in sub-blocks small enough that every stage (read, convert, merge, check, cast) works
    in the core's cache: streaming whole 16 MB blocks through each stage in turn is memory-bound and ~2x slower.
    Each computed sub-block goes to the writer thread; this thread goes on computing in another arena."""
    try:
        rows = opened.get()
        rows.prefetch(subs[0][0], subs[-1][1])
        off = dst_off
        for s, e in subs:
            scratch, release = _arena(local)
            try:
                t = rows.rows(s, e, scratch)
                if t.dtype != ref.dtype or tuple(t.shape) != block_shape(ref.shape, s, e):
                    raise AssertionError(f"{ref.name}[{s}:{e}]: produced {t.dtype}{list(t.shape)}, "
                                         f"planned {ref.dtype}")
                data = as_bytes(t)
            except BaseException:
                release()
                raise
            writer.write(out, data, off, release)
            off += len(data)
    finally:
        opened.done()
    return off - dst_off


ARENAS = 3  # scratch arenas per worker: one being computed, the others queued for (or being) written


def _arena(local: threading.local) -> tuple[Scratch, Callable[[], None]]:
    """The worker's next scratch arena, once the writer is done with what was last computed in it."""
    ring = getattr(local, "ring", None)
    if ring is None:
        ring = local.ring = [(Scratch(), threading.Event()) for _ in range(ARENAS)]
        for _, ev in ring:
            ev.set()
        local.next = 0
    scratch, ev = ring[local.next]
    local.next = (local.next + 1) % ARENAS
    ev.wait()
    ev.clear()
    scratch.reset()
    return scratch, ev.set


class _Writer:
    """The one thread that pwrites computed blocks (and starts their writeback). ext4 serializes writers to a file
    on its inode lock and the waiting ones spin (40% of the write CPU with four writers), and sync_file_range
    blocks on a full device queue: the compute threads should do neither. Items run in the order queued."""

    def __init__(self) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.aborted = False
        self.thread = threading.Thread(target=self._run, name="rlexport-pwrite", daemon=True)
        self.thread.start()

    def write(self, out, data: memoryview, offset: int, done: Callable[[], None]) -> None:
        if self.error is not None:
            done()
            raise RlexportError("write-failed", f"could not write the export ({self.error})",
                                hint="check free space and the disk") from self.error
        self.q.put((out, data, offset, done))

    def call(self, fn: Callable[[], None]) -> None:
        """Run fn on the writer thread once everything queued before it is written."""
        self.q.put((None, fn, 0, None))

    def flush(self) -> None:
        ev = threading.Event()
        self.call(ev.set)
        ev.wait()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            out, data, offset, done = item
            try:
                if out is None:
                    data()
                elif self.error is None and not self.aborted:
                    _pwrite_all(out.fd, data, offset)
                    _start_writeback(out.fd, offset, len(data))
            except BaseException as e:  # reported to the workers and to write_shards
                self.error = self.error or e
            finally:
                if done is not None:
                    done()


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
    # The blocks make no reference cycles (refcounting frees them), but they allocate enough small objects to
    # trigger collections that walk everything torch's import created: 5% of the CPU of an export. Paused here.
    collect = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        torch.set_num_threads(n)
        if collect:
            gc.enable()


def write_shards(items: list[tuple[Path, Shard]], on_bytes: Callable[[int], None] | None = None, *,
                 workers: int | None = None, link: str = "auto") -> None:
    """Write the shards (path, Shard) with a bounded pipeline of threads; each file is fsynced once, when its
    last block is written (while the next shard's blocks go on). `on_bytes` is called from this thread.
    Shards planned from a whole input file (Shard.source) are reflinked, hard-linked (link="hard") or copied."""
    workers = max(1, workers or default_workers())
    window = workers + 2
    local = threading.local()
    outs: list = []
    with _one_torch_thread_each(), ThreadPoolExecutor(workers, thread_name_prefix="rlexport-write") as pool:
        writer = _Writer()
        inflight: deque = deque()  # (future, the shard it completes or None), in submission order
        finishing: list[Future] = []

        def finish(out) -> None:  # after the shard's last write: fsync it on a worker, the writer goes on
            writer.call(lambda: finishing.append(pool.submit(out.finish)))

        def settle() -> None:
            fut, last_of = inflight.popleft()
            n = fut.result()
            if on_bytes and n:
                on_bytes(n)
            if last_of is not None:
                finish(last_of)

        try:
            for path, shard in items:
                if shard.source is not None and link != "copy":
                    out = _Placed(path, shard, link)
                    jobs = _placed_jobs(out, local)
                else:
                    out = _Out(path, shard)
                    jobs = _jobs(out, local, writer)
                outs.append(out)
                pending = None
                for job, _ in jobs:
                    if pending is not None:
                        inflight.append((pool.submit(pending), None))
                    pending = job
                    while len(inflight) >= window:
                        settle()
                if pending is not None:
                    inflight.append((pool.submit(pending), out))
                else:
                    finish(out)
            while inflight:
                settle()
            writer.flush()
            for f in finishing:
                f.result()
        except BaseException:
            writer.abort()
            for f, _ in inflight:
                f.cancel()
            for f in [*(f for f, _ in inflight), *finishing]:
                try:
                    f.result()
                except BaseException:
                    pass
            raise
        finally:
            writer.close()
            for f in finishing:
                f.cancel()
    for out in outs:  # after the pool has stopped: no fsync can be running on them
        out.close()


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
# signal: taking the --out lock (replayed right after, so the lock is released on the way out), the renames of
# a commit (stopping between them would hide the old export and not show the new one; it completes) and the
# removal of a temporary folder after a failure (an exception is already on its way out).
_critical = 0
deferred_signals: list[int] = []


@contextmanager
def uninterruptible(*, replay: bool = False):
    global _critical
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1
    if replay and _critical == 0 and deferred_signals:
        sig = deferred_signals[-1]
        deferred_signals.clear()
        os.kill(os.getpid(), sig)  # now outside the section: the CLI's handler raises KeyboardInterrupt


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
        try:
            with uninterruptible(replay=True):
                self._acquire()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _acquire(self) -> None:
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
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

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

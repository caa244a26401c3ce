"""Streaming, atomic writer of sharded safetensors folders.

The safetensors library only writes whole in-memory dicts; to keep memory at one tensor we lay the shards
out from the TensorRefs' dtype and shape (known before any byte is read), write each header, then stream the
tensors' bytes in the same order. The layout is the library's format: u64 header length, JSON header padded
with spaces to 8 bytes, then the data.
"""
from __future__ import annotations

import json
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

TMP_MARK = ".rlexport-tmp-"


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
    """A StreamLoader opened on first use by whichever worker gets there first (adapter factors load once)."""

    def __init__(self, loader: StreamLoader):
        self.loader, self.rows_obj, self.lock = loader, None, threading.Lock()

    def get(self):
        if self.rows_obj is None:
            with self.lock:
                if self.rows_obj is None:
                    self.rows_obj = self.loader.open()
        return self.rows_obj


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
            opened = _Opened(load)
            row_bytes = row_numel(ref.shape) * ref.dtype.itemsize
            step = max(1, BLOCK_BYTES // max(1, row_bytes))
            total = n_rows(ref.shape)
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
    scratch = getattr(local, "scratch", None)
    if scratch is None:
        scratch = local.scratch = Scratch()
    scratch.reset()
    t = opened.get().rows(start, stop, scratch)
    if t.dtype != ref.dtype or tuple(t.shape) != block_shape(ref.shape, start, stop):
        raise AssertionError(f"{ref.name}[{start}:{stop}]: produced {t.dtype}{list(t.shape)}, planned {ref.dtype}")
    data = as_bytes(t)
    _pwrite_all(out.fd, data, dst_off)
    _start_writeback(out.fd, dst_off, len(data))
    return len(data)


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


class AtomicFolder:
    """Write into a hidden temporary folder beside `out`, then rename it into place in one step.

    On any exception (Ctrl-C included) the temporary folder is removed and `out` is untouched.
    """

    def __init__(self, out: Path, *, force: bool):
        self.out = out
        self.force = force
        self.tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._commit()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

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

"""The shard pipeline: tensors' bytes streamed into planned safetensors files (layout.py) in bounded memory.

The safetensors library only writes whole in-memory dicts; to keep memory flat the headers are written first
and the tensors' bytes filled in at their offsets, row block by row block, by a bounded pipeline of threads.
The output folder around the files (temporary, lock, commit) is atomic.py's; the system calls are diskio.py's.
"""
from __future__ import annotations

import gc
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from . import diskio
from .layout import Shard, stored_unchanged
from ..stream import Scratch, StreamLoader, as_bytes, block_shape, n_rows, row_numel
from ..tensors import TensorRef
from .writer_thread import WriterThread


def _bytes_of(t: torch.Tensor, ref: TensorRef) -> memoryview:
    if t.dtype != ref.dtype or tuple(t.shape) != tuple(ref.shape):
        raise AssertionError(f"{ref.name}: produced {t.dtype}{list(t.shape)}, planned {ref.dtype}{list(ref.shape)}")
    return as_bytes(t)


# ---- the shard pipeline ----
# Each tensor becomes jobs of at most BLOCK_BYTES output bytes (rows of it, for streamable loads); worker threads
# read, merge, check and cast them in sub-blocks of SUB_BLOCK_BYTES, and one writer thread pwrites the sub-blocks at
# offsets fixed by the header, so reads, compute and writes overlap (torch and the os calls release the GIL). At
# most `workers + 2` jobs are in flight and each worker cycles through ARENAS scratch arenas: memory is bounded by
# workers x ARENAS x (a sub-block and its float32 intermediates), whatever the model or tensor size.
BLOCK_BYTES = 16 << 20
SUB_BLOCK_BYTES = 1536 << 10  # output bytes per compute step and pwrite: float32 intermediates stay in L3; bigger
                              # writes hold ext4's inode lock longer (the other writers spin on it)
SUB_MIN_ROWS = 16            # fewer rows make short, slow matrix products (and lora.streamed.MIN_ROWS widens them)
COPY_BYTES = 64 << 20     # byte-range copies (copy_file_range) need no buffer: bigger steps
READ_AHEAD_BYTES = 128 << 20  # blocks queued (and their reads requested from the OS) ahead of the workers
DROP_BEHIND_ABOVE = 0.25  # of physical memory: exports larger than this are written behind (writer_thread.py)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def default_workers() -> int:
    """A compute thread per core plus one, so a core stays busy while a thread waits for a read; the writes go
    to the writer thread (_Writer)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(2, cores + 1)


class _Opened:
    """A StreamLoader opened by the first worker that needs it (adapter factors load once per tensor) and closed
    when its last block is written (file handles and factors are released tensor by tensor)."""

    def __init__(self, loader: StreamLoader, blocks: int, registry: list):
        self.loader, self.rows_obj, self.lock, self.left = loader, None, threading.Lock(), blocks
        registry.append(self)  # write_shards closes what a failed export left open

    def get(self):
        with self.lock:
            if self.rows_obj is None:
                self.rows_obj = self.loader.open()
            return self.rows_obj

    def done(self) -> None:
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.close()

    def close(self) -> None:
        if self.rows_obj is not None:
            self.rows_obj.close()
            self.rows_obj = None


def _placed_jobs(out: diskio.PlacedFile, local: threading.local, registry: list):
    data = out.shard.nbytes
    header = out.size - data
    if out.copies:
        for i in range(0, out.size, COPY_BYTES):
            n = min(COPY_BYTES, out.size - i)
            reported = max(0, min(i + n, out.size) - max(i, header))  # progress counts tensor bytes only
            yield partial(_copy_job, out.shard.source, i, out, i, n, reported), reported, None
    for ref in out.shard.refs:
        st = stored_unchanged(ref)
        if st is None:
            raise AssertionError(f"{ref.name}: planned as an unchanged tensor of {out.shard.source}")
        if not st.checks or not ref.numel:
            if not out.copies:
                yield partial(_count, ref.nbytes), ref.nbytes, None
            continue
        row_bytes = row_numel(ref.shape) * ref.dtype.itemsize
        step = max(1, BLOCK_BYTES // max(1, row_bytes))
        total = n_rows(ref.shape)
        opened = _Opened(st.file, -(-total // step), registry)
        for s in range(0, total, step):
            e = min(total, s + step)
            n = (e - s) * row_bytes
            yield partial(_verify_job, opened, st.checks, s, e, 0 if out.copies else n, local), n, \
                partial(st.file.prefetch_hint, s, e)


def _count(n: int) -> int:
    return n


def _verify_job(opened: _Opened, checks, start: int, stop: int, reported: int, local: threading.local) -> int:
    scratch = getattr(local, "scratch", None)
    if scratch is None:
        scratch = local.scratch = Scratch()
    scratch.reset()
    try:
        rows = opened.get()
        t = rows.rows(start, stop, scratch)
        for check in checks:
            check(t)
    finally:
        opened.done()
    return reported


def _jobs(out: diskio.OutFile, local: threading.local, writer: WriterThread, registry: list):
    """(callable, nbytes, read-ahead hint or None) for every block of the shard, in file order."""
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
                yield partial(_copy_job, src, src_off + i, out, offset + i, n), n, None
        elif isinstance(load, StreamLoader) and load.streamable and ref.numel:
            row_bytes = row_numel(ref.shape) * ref.dtype.itemsize
            subs = _sub_blocks(n_rows(ref.shape), row_bytes)
            per_job = max(1, BLOCK_BYTES // max(1, (subs[0][1] - subs[0][0]) * row_bytes))
            groups = [subs[i:i + per_job] for i in range(0, len(subs), per_job)]
            opened = _Opened(load, len(groups), registry)
            for g in groups:
                s, e = g[0][0], g[-1][1]
                yield (partial(_rows_job, ref, opened, g, out, offset + s * row_bytes, local, writer),
                       (e - s) * row_bytes, partial(load.prefetch_hint, s, e))
        else:
            yield partial(_whole_job, ref, out, offset), ref.nbytes, None
        offset += ref.nbytes


def _copy_job(src: Path, src_off: int, out, dst_off: int, n: int, reported: int | None = None) -> int:
    diskio.copy_range(src, src_off, out.fd, dst_off, n)
    diskio.start_writeback(out.fd, dst_off, n)
    return n if reported is None else reported


def _sub_blocks(total: int, row_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of ~SUB_BLOCK_BYTES, never shorter than SUB_MIN_ROWS (a short tail joins the range before)."""
    step = max(SUB_MIN_ROWS, SUB_BLOCK_BYTES // max(1, row_bytes))
    out = [(s, min(total, s + step)) for s in range(0, total, step)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < SUB_MIN_ROWS:
        out[-2:] = [(out[-2][0], out[-1][1])]
    return out


def _rows_job(ref: TensorRef, opened: _Opened, subs: list[tuple[int, int]], out: diskio.OutFile, dst_off: int,
              local: threading.local, writer: WriterThread) -> int:
    """One block, computed in sub-blocks small enough that every stage (read, convert, merge, check, cast) works
    in the core's cache: streaming whole 16 MB blocks through each stage in turn is memory-bound and ~2x slower.
    Each computed sub-block goes to the writer thread; this thread goes on computing in another arena."""
    try:
        rows = opened.get()
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


def _whole_job(ref: TensorRef, out: diskio.OutFile, dst_off: int) -> int:
    data = _bytes_of(ref.load(), ref)
    diskio.pwrite_all(out.fd, data, dst_off)
    diskio.start_writeback(out.fd, dst_off, len(data))
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
    opened: list[_Opened] = []
    with _one_torch_thread_each(), ThreadPoolExecutor(workers, thread_name_prefix="rlexport-write") as pool:
        total = sum(shard.nbytes for _, shard in items)
        writer = WriterThread(drop_behind=total > DROP_BEHIND_ABOVE * _physical_memory())
        inflight: deque = deque()  # (future, the shard it completes or None), in submission order
        finishing: list[Future] = []

        def finish(out) -> None:  # after the shard's last write: fsync it on a worker, the writer goes on
            def hand_over() -> None:
                writer.forget(out)
                finishing.append(pool.submit(out.finish, writer.drop_behind) if isinstance(out, diskio.OutFile)
                                 else pool.submit(out.finish))
            writer.call(hand_over)

        queued: deque = deque()  # bytes of the jobs in `inflight`, same order

        def settle() -> None:
            queued.popleft()
            fut, last_of = inflight.popleft()
            n = fut.result()
            if on_bytes and n:
                on_bytes(n)
            if last_of is not None:
                finish(last_of)

        try:
            for path, shard in items:
                if shard.source is not None and link != "copy":
                    out = diskio.PlacedFile(path, shard, link)
                    jobs = _placed_jobs(out, local, opened)
                else:
                    out = diskio.OutFile(path, shard)
                    jobs = _jobs(out, local, writer, opened)
                outs.append(out)
                pending = None
                for job, nbytes, hint in jobs:
                    if pending is not None:
                        inflight.append((pool.submit(pending), None))
                    pending = job
                    # queued jobs hold no memory: queue up to READ_AHEAD_BYTES of them, their reads requested now
                    while len(inflight) >= window and sum(queued) >= READ_AHEAD_BYTES or len(inflight) >= 64:
                        settle()
                    queued.append(nbytes)
                    if hint is not None:
                        hint()
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
    for o in opened:  # tensors whose last block never ran (an error stopped the export)
        o.close()


def write_shard(path: Path, shard: Shard, on_bytes: Callable[[int], None] | None = None) -> None:
    write_shards([(path, shard)], on_bytes)

"""Streamable tensor loads: row blocks of a tensor, computed on demand, in bounded memory.

A `TensorRef.load` is any zero-argument callable returning the whole tensor. The loads built here are also
`StreamLoader`s: the writer can ask them for row blocks (`open().rows(start, stop, scratch)`) so that no
tensor is ever held whole, a 1 GB embedding included, and several blocks can be computed and written at once
by worker threads. Every stage of a transform chain (file slice -> LoRA merge (lora/streamed.py) -> cast) is
row-separable, so a chain of StreamLoaders is one too; anything else (`TensorRef.mapped`, pickled weights)
falls back to `load()`.

Blocks are written into a per-thread `Scratch` arena that the writer reuses from block to block, so the hot
path allocates nothing and page-faults nothing after the first blocks.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import RlexportError


def block_shape(shape: tuple[int, ...], start: int, stop: int) -> tuple[int, ...]:
    """Shape of rows [start, stop) of a tensor; a 0-d tensor is one row."""
    return (stop - start, *shape[1:]) if shape else ()


def n_rows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def row_numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if shape else 1


def as_bytes(t: torch.Tensor) -> memoryview:
    flat = t.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class Scratch:
    """Reusable buffers for one thread: the i-th `take` of a block gets the i-th buffer, grown as needed."""

    def __init__(self) -> None:
        self._bufs: list[torch.Tensor] = []
        self._i = 0

    def reset(self) -> None:
        self._i = 0

    def take(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        i = self._i
        self._i += 1
        if i == len(self._bufs):
            self._bufs.append(torch.empty(0, dtype=torch.uint8))
        if self._bufs[i].numel() < n:
            self._bufs[i] = torch.empty(0, dtype=torch.uint8)  # free the old one first
            # whole MiBs: blocks of slightly different sizes then reuse the buffer instead of each freeing and
            # allocating a slightly larger one (which leaves the old one as a hole in the heap: RSS creeps up)
            cap = n if n < (256 << 10) else -(-n // (1 << 20)) << 20
            self._bufs[i] = torch.empty(cap, dtype=torch.uint8)
        return self._bufs[i][:n].view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._bufs)


class Rows:
    """An opened StreamLoader: `rows()` may be called from several threads at once. The block it returns lives
    in `scratch` (or is fresh) and belongs to the caller, who may modify it in place."""

    def rows(self, start: int, stop: int, scratch: Scratch) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class StreamLoader:
    """A TensorRef.load that can also produce row blocks. Subclasses set dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    streamable = True

    @property
    def byte_range(self) -> tuple[Path, int, int] | None:
        """(file, offset, nbytes) when the output bytes are stored verbatim in a file and need no check."""
        return None

    @property
    def stored(self) -> "Stored | None":
        """Where the output bytes are stored verbatim, with the checks they must still pass (or None)."""
        return None

    def open(self) -> Rows:
        raise NotImplementedError

    def prefetch_hint(self, start: int, stop: int) -> None:
        """Ask the OS to start reading what rows [start, stop) need, before anyone opens this (wrappers pass it
        on to their `inner` or `base`). The writer calls it on the blocks queued ahead of its workers."""
        for attr in ("inner", "base"):
            inner = getattr(self, attr, None)
            if isinstance(inner, StreamLoader):
                inner.prefetch_hint(start, stop)
                return

    def __call__(self) -> torch.Tensor:
        r = self.open()
        try:
            return r.rows(0, n_rows(self.shape), Scratch())  # a fresh arena: the tensor owns its memory
        finally:
            r.close()


def row_blocks(load, shape: tuple[int, ...], itemsize: int, max_bytes: int = 64 * 2**20):
    """A tensor's rows in blocks of at most `max_bytes` (in its own dtype), read from the file where the loader
    can stream, else sliced from the whole tensor. Each block is fresh: the caller may keep it."""
    rows = n_rows(shape)
    step = max(1, max_bytes // max(1, row_numel(shape) * itemsize))
    if not isinstance(load, StreamLoader) or not load.streamable or rows <= step:
        yield load()
        return
    r = load.open()
    try:
        for start in range(0, rows, step):
            yield r.rows(start, min(rows, start + step), Scratch())
    finally:
        r.close()


# ---- reading: byte ranges of safetensors files with pread, never mmap (mapped pages would count as RSS) ----

def pread_into(fd: int, buf: torch.Tensor, offset: int, path: Path | str) -> None:
    view = as_bytes(buf) if buf.numel() else memoryview(b"")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise RlexportError("corrupt-safetensors", "unreadable safetensors file (file is shorter than its "
                                "header says)", file=path,
                                hint="the file is truncated or damaged; copy it again from the training machine")
        done += n


class FileSlice(StreamLoader):
    """A tensor stored contiguously at `offset` in `path` (a safetensors data section)."""

    def __init__(self, path: Path | str, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
                 on_error: Callable[[OSError], Exception] | None = None, name: str | None = None):
        self.path, self.offset, self.dtype, self.shape = Path(path), offset, dtype, tuple(shape)
        self.on_error = on_error
        self.name = name  # the tensor's name in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def byte_range(self) -> tuple[Path, int, int]:
        return self.path, self.offset, self.nbytes

    @property
    def stored(self) -> "Stored":
        return Stored(self, ())

    def prefetch_hint(self, start: int, stop: int) -> None:
        # Several threads read blocks of one tensor, out of order: the kernel's sequential readahead gives up on
        # that pattern, so each queued block's whole range is requested up front instead.
        if not hasattr(os, "posix_fadvise"):
            return
        row_bytes = row_numel(self.shape) * self.dtype.itemsize
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.posix_fadvise(fd, self.offset + start * row_bytes, (stop - start) * row_bytes,
                                 os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass  # only a hint: a real read reports the error

    def open(self) -> Rows:
        try:
            return _FileRows(self)
        except OSError as e:
            raise self._error(e) from None

    def _error(self, e: OSError) -> Exception:
        return self.on_error(e) if self.on_error is not None else e


class _FileRows(Rows):
    def __init__(self, spec: FileSlice):
        self.spec = spec
        self.fd = os.open(spec.path, os.O_RDONLY | os.O_CLOEXEC)
        self.row_bytes = row_numel(spec.shape) * spec.dtype.itemsize

    def rows(self, start: int, stop: int, scratch: Scratch) -> torch.Tensor:
        spec = self.spec
        out = scratch.take(spec.dtype, block_shape(spec.shape, start, stop))
        try:
            pread_into(self.fd, out, spec.offset + start * self.row_bytes, spec.path)
        except OSError as e:
            raise spec._error(e) from None
        return out

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


COMPARE_BYTES = 16 << 20  # float32 bytes of each side per step of equal_values


def equal_values(a: Callable[[], torch.Tensor], b: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> bool:
    """Whether two loads of one shape hold equal values (as float32), compared row block by row block when both
    stream: a tied pair of 1 GB embeddings is compared in bounded memory."""
    streams = all(isinstance(x, StreamLoader) and x.streamable for x in (a, b))
    if not streams:
        return torch.equal(a().float(), b().float())
    if a.byte_range is not None and a.byte_range == b.byte_range:
        return True
    ra, rb = a.open(), b.open()
    sa, sb = Scratch(), Scratch()
    try:
        total, step = n_rows(shape), max(1, COMPARE_BYTES // max(1, row_numel(shape) * 4))
        for s in range(0, total, step):
            sa.reset()
            sb.reset()
            e = min(total, s + step)
            if not torch.equal(ra.rows(s, e, sa).float(), rb.rows(s, e, sb).float()):
                return False
        return True
    finally:
        ra.close()
        rb.close()


@dataclass(frozen=True)
class Stored:
    """An output tensor whose bytes are `file`'s bytes: copied (or the whole file linked) after `checks`."""

    file: FileSlice
    checks: tuple[Callable[[torch.Tensor], None], ...]


# ---- transforms ----

CheckFn = Callable[[torch.Tensor], None]


class Cast(StreamLoader):
    """Cast once to `dtype`, after `check(tensor)` (NaN/Inf and overflow refusals) on the uncast values."""

    def __init__(self, inner: Callable[[], torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...],
                 check: CheckFn | None):
        self.inner, self.dtype, self.shape, self.check = inner, dtype, tuple(shape), check
        self.streamable = isinstance(inner, StreamLoader) and inner.streamable

    @property
    def byte_range(self):
        if self.check is None and isinstance(self.inner, StreamLoader) and self.inner.dtype == self.dtype:
            return self.inner.byte_range
        return None

    @property
    def stored(self) -> "Stored | None":
        if not isinstance(self.inner, StreamLoader) or self.inner.dtype != self.dtype:
            return None
        inner = self.inner.stored
        if inner is None or self.check is None:
            return inner
        return Stored(inner.file, (*inner.checks, self.check))

    def open(self) -> Rows:
        return _CastRows(self)

    def __call__(self) -> torch.Tensor:
        if self.streamable:
            return super().__call__()
        t = self.inner()
        if self.check is not None:
            self.check(t)
        return t if t.dtype == self.dtype else t.to(self.dtype)


class _CastRows(Rows):
    def __init__(self, spec: Cast):
        self.spec = spec
        self.inner = spec.inner.open()

    def rows(self, start: int, stop: int, scratch: Scratch) -> torch.Tensor:
        t = self.inner.rows(start, stop, scratch)
        if self.spec.check is not None:
            self.spec.check(t)
        if t.dtype == self.spec.dtype:
            return t
        out = scratch.take(self.spec.dtype, tuple(t.shape))
        out.copy_(t)
        return out

    def close(self) -> None:
        self.inner.close()

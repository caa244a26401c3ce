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
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import RlexportError
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
    flat = t.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_shard(path: Path, shard: Shard, on_bytes: Callable[[int], None] | None = None) -> None:
    with open(path, "wb") as f:
        f.write(_header(shard.refs))
        for ref in shard.refs:
            data = _bytes_of(ref.load(), ref)
            f.write(data)
            if on_bytes:
                on_bytes(len(data))
        f.flush()
        os.fsync(f.fileno())


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

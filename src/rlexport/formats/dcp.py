"""torch.distributed.checkpoint (DCP) folders, read without torch.distributed's loader: `.metadata` + `*.distcp`.

Megatron's torch_dist (verl Megatron, Megatron-LM, slime) and NeMo-RL's DTensor policy all save this way.
`.metadata` pickles DCP's `Metadata` (protocol 4, which torch's weights-only unpickler cannot read): a
`pickle.Unpickler` whose `find_class` allows only `_safe_classes` reads it, so a crafted file runs nothing. It
holds each tensor's global shape and dtype, its chunks (offsets, sizes) and where each chunk is stored: a byte
range of a `.distcp` file holding a `torch.save`d tensor (a small zip; `torch.load(weights_only=True)` on meta says
where its storage sits) or raw bytes. A `TensorRef` made here (`ref`) is a view of one stored tensor (fixed
leading indices, row ranges of the next axis, the rest whole); its chunks are opened only when it is loaded.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path, PosixPath

import torch

from ..errors import RlexportError
from ..stream import StreamLoader
from ..tensors import TensorRef
from .access import input_error, quiet_torch_load, remember
from .dtensor import Part, Sharded

HINT = "copy the whole checkpoint folder (.metadata and every .distcp file) again from the training machine"


def _safe_classes() -> dict:
    """The globals a DCP .metadata names (checked on torch 2.13, megatron-core 0.16.1, NeMo-RL 0.6), nothing else."""
    from torch.distributed.checkpoint import filesystem, metadata, planner
    out = {("torch", "Size"): torch.Size, ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
           ("pathlib", "PosixPath"): PosixPath}  # StorageMeta.checkpoint_id, when saved to a Path
    for mod, names in ((metadata, ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                                   "BytesStorageMetadata", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")),
                       (planner, ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
                       (filesystem, ("_StorageInfo",))):
        out.update({(mod.__name__, n): getattr(mod, n) for n in names if hasattr(mod, n)})
    return out


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        found = _safe_classes().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} was not an allowed global")
        return found


def load_metadata(path: Path, hint: str = HINT):
    """DCP's Metadata from `.metadata`, through the allowlist; unsafe-pickle / corrupt-pickle otherwise."""
    from torch.distributed.checkpoint.metadata import Metadata
    try:
        remember(path)
        with open(path, "rb") as f:
            md = _Unpickler(f).load()
    except OSError as e:
        raise input_error(path, e) from None
    except Exception as e:  # a refused global, or damaged bytes (truncated, EOFError, TypeError...)
        if calls := re.search(r"GLOBAL (\S+) was not an allowed global", str(e)):
            raise RlexportError("unsafe-pickle", f"refused to unpickle: it would call {calls.group(1)}, which no torch "
                                "distributed checkpoint does; nothing in it was run", file=path,
                                hint="only torch.distributed.checkpoint's metadata classes are read") from None
        md = f"{type(e).__name__}: {str(e)[:120]}"
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        why = md if isinstance(md, str) else f"a {type(md).__name__}, not torch's checkpoint Metadata"
        raise RlexportError("corrupt-pickle", f"unreadable .metadata ({why})", file=path, hint=hint)
    return md


# ---- the index: tensors, their chunks, the files they live in ----

@dataclass(frozen=True)
class Chunk:
    file: Path
    info: object                 # DCP's _StorageInfo: relative_path, offset, length
    offsets: tuple[int, ...]     # where the chunk sits in the global tensor
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class Stored:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]       # the global shape
    chunks: tuple[Chunk, ...]    # chunks with a storage entry (a hole is reported when a view is made)


@dataclass(frozen=True)
class Index:
    folder: Path
    tensors: dict[str, Stored]   # every tensor of the checkpoint, by key (nothing read yet)
    others: tuple[str, ...]      # byte entries (_extra_state, rng_state, optimizer param groups)
    files: dict[str, int]        # relative path of each .distcp file -> its size


def open_index(folder: Path, *, hint: str = HINT) -> Index:
    """Read `.metadata` and check every file it names is there and long enough; no tensor bytes are read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = load_metadata(folder / ".metadata", hint)
    where: dict[str, dict] = {}
    for idx, info in md.storage_data.items():
        where.setdefault(idx.fqn, {})[tuple(idx.offset or ())] = info
    ends: dict[str, int] = {}
    for info in (i for found in where.values() for i in found.values()):
        rel = str(info.relative_path)
        if "/" in rel or rel.startswith(".") or not isinstance(info.offset, int) or not isinstance(info.length, int):
            raise RlexportError("corrupt-checkpoint", f"the .metadata names a storage entry {rel!r} outside the "
                                "checkpoint folder", file=folder / ".metadata", hint=hint)
        ends[rel] = max(ends.get(rel, 0), info.offset + info.length)
    files = {}
    for rel in sorted(ends):
        f = folder / rel
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise RlexportError("missing-file", f"{rel} of the distributed checkpoint is missing", file=f,
                                hint=hint) from None
        except OSError as e:
            raise input_error(f, e) from None
        if size < ends[rel]:
            raise RlexportError("corrupt-checkpoint", f"{rel} is {size} bytes, the .metadata says chunks end at byte "
                                f"{ends[rel]} (truncated, or a .metadata of another save)", file=f, hint=hint)
        remember(f)  # export refuses it if it changes meanwhile
        files[rel] = size
    tensors, others = {}, []
    for key, meta in md.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            others.append(key)
            continue
        found = where.get(key, {})
        chunks = tuple(Chunk(folder / str(info.relative_path), info, tuple(c.offsets), tuple(c.sizes))
                       for c in meta.chunks if (info := found.get(tuple(c.offsets))) is not None)
        tensors[key] = Stored(key, meta.properties.dtype, tuple(meta.size), chunks)
    return Index(folder, tensors, tuple(others), files)


# ---- chunks: byte ranges of .distcp files ----

class _Window(io.RawIOBase):
    """Bytes [start, start + length) of a file, as a seekable file for torch.load."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self):
        return True

    seekable = readable

    def seek(self, pos, whence=0):
        self.pos = max(0, pos + (0, self.pos, self.length)[whence])
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        data = os.pread(self.fd, max(0, min(len(b), self.length - self.pos)), self.start + self.pos)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


def chunk_offset(chunk: Chunk, dtype: torch.dtype, name: str, hint: str = HINT) -> int:
    """The file offset of a chunk's contiguous bytes (raw, or the storage of the torch.save'd tensor)."""
    path, info, sizes = chunk.file, chunk.info, chunk.sizes
    raw = math.prod(sizes) * dtype.itemsize
    if getattr(info, "transform_descriptors", None):
        raise RlexportError("unsupported-checkpoint", f"'{name}' is stored with transforms "
                            f"{info.transform_descriptors}", file=path, hint="save it without storage transforms")

    def bad(why: str) -> RlexportError:
        return RlexportError("corrupt-checkpoint", f"unreadable chunk of '{name}' ({why})", file=path, hint=hint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise input_error(path, e) from None
    try:
        if os.fstat(fd).st_size < info.offset + info.length:
            raise bad("the file is shorter than the checkpoint's .metadata says")
        if os.pread(fd, 4, info.offset) != b"PK\x03\x04":
            if info.length != raw:
                raise bad(f"{info.length} bytes, expected a torch.save'd tensor or {raw} raw bytes")
            return info.offset
        try:
            with quiet_torch_load():
                t = torch.load(_Window(fd, info.offset, info.length), map_location="meta", weights_only=True)
        except pickle.UnpicklingError:
            raise RlexportError("unsafe-pickle", f"refused to unpickle the chunk of '{name}': it is not a plain "
                                "tensor; nothing in it was run", file=path, hint=hint) from None
        except (RuntimeError, EOFError, ValueError, KeyError) as e:
            raise bad(str(e).splitlines()[0][:120] if str(e) else type(e).__name__) from None
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(sizes) \
                or not t.is_contiguous():
            what = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise bad(f"{what} stored, the .metadata says {dtype} {list(sizes)}")
        data = getattr(t.untyped_storage(), "_checkpoint_offset", None)  # where torch found it, from the window start
        start = (data or 0) + t.storage_offset() * t.element_size()
        if data is None or start + raw > min(info.length, data + t.untyped_storage().nbytes()):
            raise bad("its bytes are not inside the chunk's byte range")
        return info.offset + start
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Cut:
    chunk: Chunk
    skip: int                    # elements before the first one read, inside the chunk
    out: tuple[int, ...]         # where the block goes in the view
    shape: tuple[int, ...]       # the block's shape


class _Lazy(StreamLoader):
    """A view of a stored tensor cut from its chunks; the chunks' zips are read when it is first opened."""

    def __init__(self, cuts: tuple[_Cut, ...], dtype, shape, key: str, hint: str):
        self.cuts, self.dtype, self.shape, self.key, self.hint, self._parts = cuts, dtype, tuple(shape), key, hint, None

    def open(self):
        if self._parts is None:
            size = self.dtype.itemsize
            self._parts = tuple(Part(c.chunk.file, chunk_offset(c.chunk, self.dtype, self.key, self.hint) +
                                     c.skip * size, c.out, c.shape) for c in self.cuts)
        return Sharded(self._parts, self.dtype, self.shape).open()


def ref(stored: Stored, name: str, *, lead: tuple[int, ...] = (), rows=None, hint: str = HINT,
        file: Path | None = None) -> TensorRef:
    """`name` = stored[*lead] with the rows (axis len(lead)) in `rows` [(start, stop), ...] (None: all) stacked.

    Each chunk block read is contiguous in its chunk (fixed leading indices, a run of whole rows of the chunk);
    chunks split later axes too (row-parallel linears split columns): a block lands at the chunk's column offsets.
    """
    n, shape = len(lead), stored.shape
    inner = shape[n:]
    ranges = rows if rows is not None else [(0, inner[0])] if inner else [None]
    cuts, out_rows = [], 0
    for rng in ranges:
        for c in stored.chunks:
            if any(not o <= i < o + s for i, o, s in zip(lead, c.offsets, c.sizes)):
                continue
            csz = c.sizes[n:]
            skip = sum((i - o) * math.prod(c.sizes[k + 1:]) for k, (i, o) in enumerate(zip(lead, c.offsets)))
            if rng is None:  # a 0-d view
                cuts.append(_Cut(c, skip, (), ()))
                continue
            lo, hi = max(rng[0], c.offsets[n]), min(rng[1], c.offsets[n] + csz[0])
            if lo < hi:
                skip += (lo - c.offsets[n]) * math.prod(csz[1:])
                cuts.append(_Cut(c, skip, (out_rows + lo - rng[0], *c.offsets[n + 1:]), (hi - lo, *csz[1:])))
        if rng is not None:
            out_rows += rng[1] - rng[0]
    out_shape = (out_rows, *inner[1:]) if inner else ()
    if sum(math.prod(c.shape) for c in cuts) != math.prod(out_shape):
        raise RlexportError("corrupt-checkpoint", f"the stored chunks of '{stored.key}' do not cover {name} "
                            f"{list(out_shape)}", file=file or (stored.chunks[0].file.parent / ".metadata"
                                                                 if stored.chunks else None), hint=hint)
    return TensorRef(name, stored.dtype, out_shape, _Lazy(tuple(cuts), stored.dtype, out_shape, stored.key, hint),
                     str(cuts[0].chunk.file if cuts else ""))

"""Per-rank DTensor state dicts (FSDP2 `state_dict()`, FSDP1 SHARDED_STATE_DICT with a device mesh), read lazily.

Each rank file is a torch zip pickle of `{name: DTensor}`. It is unpickled with torch's weights-only unpickler
(after `import torch.distributed.tensor`, which allowlists DTensor, DeviceMesh and the placements) on the meta
device: names, global shapes, placements and each local shard's byte offset, no tensor data. Each global tensor
is then a `Sharded` loader that `pread`s, for a block of rows, just those rows of each rank's shard.

A rank's region of the global tensor follows its coordinate in the device mesh, mesh dim by mesh dim:
`Shard(d)` splits dim d as torch.chunk does (ceil(n / k) per rank, the last ones shorter or empty) and
`Replicate()` keeps it whole (coordinate 0 is read). `Partial` and strided shards are refused.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RlexportError
from ..stream import Rows, Scratch, StreamLoader, block_shape, pread_into
from ..tensors import TensorRef
from .access import input_error, quiet_torch_load, remember, torch_zip_cut_short, unpickler_reason
from .pickles import PtFile, records

HINT = "copy the whole actor/ (or critic/) folder of the step again from the training machine"


def _bad(path: Path, why: str, hint: str = HINT, code: str = "verl-shard-mismatch") -> RlexportError:
    return RlexportError(code, why, file=path, hint=hint)


@contextmanager
def _quiet_mesh():
    """Unpickling a DeviceMesh without process groups logs a torch.compile warning that says nothing here."""
    log = logging.getLogger("torch.distributed.device_mesh")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def load_rank_file(path: Path) -> PtFile:
    """A rank file unpickled on meta with the weights-only unpickler; refused as unsafe-pickle otherwise."""
    import torch.distributed.tensor  # noqa: F401 - registers DTensor and its placements as safe globals
    try:
        remember(path)
        if torch_zip_cut_short(path) or not zipfile.is_zipfile(path):
            raise RlexportError("corrupt-pickle", "unreadable rank file (not a complete torch zip file)", file=path,
                                hint="the file is truncated or damaged; copy it again from the training machine")
        with quiet_torch_load(), _quiet_mesh():
            obj = torch.load(path, map_location="meta", weights_only=True)
        stored = records(path)
    except RlexportError:
        raise
    except pickle.UnpicklingError as e:
        calls = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        why = f"it would call {calls.group(1)}, which no verl rank file does" if calls else \
            unpickler_reason(e, "not a verl rank file")
        raise RlexportError("unsafe-pickle", f"refused to unpickle: {why}; nothing in it was run", file=path,
                            hint="only tensors, DTensors and their placements are read; if you trust the file, "
                                 "convert it where it was made") from None
    except OSError as e:
        raise input_error(path, e) from None
    except Exception as e:  # whatever torch raises on damaged bytes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RlexportError("corrupt-pickle", f"unreadable rank file ({first})", file=path, hint=HINT) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise RlexportError("corrupt-pickle", "not a state dict of tensors", file=path, hint=HINT)
    return PtFile(path, obj, stored, what="rank file")


@dataclass(frozen=True)
class Part:
    """One rank's shard: `shape` elements at `starts` of the global tensor, stored at `offset` of `path`."""

    path: Path
    offset: int
    starts: tuple[int, ...]
    shape: tuple[int, ...]


def _mesh_ranks(pt: PtFile, mesh, cache: dict) -> torch.Tensor:
    """The global ranks of a device mesh, as an int tensor of the mesh's shape (read from the file: a few bytes)."""
    key = id(mesh)
    if key not in cache:
        m = mesh.mesh
        if m.device.type == "meta":
            out = torch.empty(tuple(m.shape), dtype=m.dtype)
            fd = os.open(pt.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                pread_into(fd, out, pt.offset(m, "the device mesh"), pt.path)
            finally:
                os.close(fd)
            m = out
        cache[key] = m
    return cache[key]


def _region(path: Path, name: str, shape, placements, mesh_shape, coord) -> tuple[list[int], list[int]] | None:
    """(starts, sizes) of the rank at `coord`; None for a replica that another rank's shard already covers."""
    from torch.distributed.tensor import Replicate, Shard
    starts, sizes = [0] * len(shape), list(shape)
    for i, p in enumerate(placements):
        if type(p) is Replicate:
            if coord[i] != 0:
                return None
        elif type(p) is Shard:
            d, n, k = p.dim, mesh_shape[i], coord[i]
            cs = -(-sizes[d] // n)
            begin = min(k * cs, sizes[d])
            starts[d] += begin
            sizes[d] = max(0, min(cs, sizes[d] - begin))
        else:
            raise RlexportError("unsupported-checkpoint", f"'{name}' has placement {p}, which rlexport cannot "
                                "put back together", file=path, hint="save the checkpoint with FSDP's full state "
                                "dict (or verl's model merger) instead")
    return starts, sizes


def sharded_refs(files: list[Path]) -> list[TensorRef]:
    """Global tensors of the rank files `files` (rank order), in rank 0's order; no tensor data is read."""
    from torch.distributed.tensor import DTensor
    pts = [load_rank_file(f) for f in files]
    names = list(pts[0].obj)
    for pt in pts[1:]:
        if set(pt.obj) != set(names):
            odd = sorted(set(pt.obj) ^ set(names))[0]
            raise _bad(pt.path, f"rank files hold different tensors ('{odd}' is in one and not another)")
    parts: dict[str, list[Part]] = {n: [] for n in names}
    meta: dict[str, tuple] = {}
    for rank, pt in enumerate(pts):
        meshes: dict = {}
        for name in names:
            t = pt.obj[name]
            if isinstance(t, DTensor):
                local, shape = t._local_tensor, tuple(t.shape)
                mesh_ranks = _mesh_ranks(pt, t.device_mesh, meshes)
                where = (mesh_ranks == rank).nonzero()
                if len(where) != 1:
                    raise _bad(pt.path, f"the device mesh of '{name}' ({mesh_ranks.tolist()}) does not hold rank "
                               f"{rank}, the rank in this file's name")
                region = _region(pt.path, name, shape, t.placements, tuple(mesh_ranks.shape), where[0].tolist())
                key = (shape, t.dtype, tuple(map(str, t.placements)), tuple(mesh_ranks.shape))
            else:  # a plain tensor: the same on every rank (a buffer, a world size 1 save)
                local, shape = t, tuple(t.shape)
                region = ([0] * len(shape), list(shape)) if rank == 0 else None
                key = (shape, t.dtype, "plain", ())
            if meta.setdefault(name, key) != key:
                raise _bad(pt.path, f"'{name}' is {list(shape)} {key[2]} here but {list(meta[name][0])} "
                           f"{meta[name][2]} in rank 0's file: the shards do not come from one save")
            if region is None:
                continue
            starts, sizes = region
            if tuple(local.shape) != tuple(sizes):
                raise _bad(pt.path, f"rank {rank}'s shard of '{name}' is {list(local.shape)}, but a global "
                           f"{list(shape)} split by {key[2]} gives it {sizes}: the shards do not add up")
            if math.prod(sizes):
                parts[name].append(Part(pt.path, pt.offset(local, name), tuple(starts), tuple(sizes)))
    refs = []
    for name in names:
        shape, dtype = meta[name][0], meta[name][1]
        if sum(math.prod(p.shape) for p in parts[name]) != math.prod(shape):
            raise _bad(files[0].parent, f"the rank files' shards of '{name}' do not add up to its global shape "
                       f"{list(shape)} (a rank file missing or from another save)")
        if len(parts[name]) == 1 and parts[name][0].shape == shape:
            from ..stream import FileSlice
            p = parts[name][0]
            load = FileSlice(p.path, p.offset, dtype, shape, on_error=lambda e, f=p.path: input_error(f, e), name=name)
        else:
            load = Sharded(tuple(parts[name]), dtype, shape)
        refs.append(TensorRef(name, dtype, shape, load, str(files[0])))
    return refs


class Sharded(StreamLoader):
    """A global tensor made of rank shards; row blocks read only the rows they need from each shard."""

    def __init__(self, parts: tuple[Part, ...], dtype: torch.dtype, shape: tuple[int, ...]):
        self.parts, self.dtype, self.shape = parts, dtype, tuple(shape)

    def open(self) -> Rows:
        return _ShardedRows(self)


class _ShardedRows(Rows):
    def __init__(self, spec: Sharded):
        self.spec, self.fds = spec, {}
        try:
            for p in spec.parts:
                if p.path not in self.fds:
                    self.fds[p.path] = os.open(p.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self.close()
            raise input_error(p.path, e) from None

    def rows(self, start: int, stop: int, scratch: Scratch) -> torch.Tensor:
        spec = self.spec
        out = scratch.take(spec.dtype, block_shape(spec.shape, start, stop))
        if not spec.shape:  # a 0-d tensor is never sharded
            p = spec.parts[0]
            pread_into(self.fds[p.path], out, p.offset, p.path)
            return out
        for p in spec.parts:
            lo, hi = max(start, p.starts[0]), min(stop, p.starts[0] + p.shape[0])
            if lo >= hi:
                continue
            row = math.prod(p.shape[1:]) * spec.dtype.itemsize
            at = p.offset + (lo - p.starts[0]) * row
            dst = out[lo - start: hi - start]
            if all(s == 0 for s in p.starts[1:]) and p.shape[1:] == spec.shape[1:]:
                pread_into(self.fds[p.path], dst, at, p.path)  # whole rows: straight into the block
            else:
                tmp = scratch.take(spec.dtype, (hi - lo, *p.shape[1:]))
                pread_into(self.fds[p.path], tmp, at, p.path)
                dst[(slice(None), *(slice(s, s + n) for s, n in zip(p.starts[1:], p.shape[1:])))].copy_(tmp)
        return out

    def close(self) -> None:
        fds, self.fds = self.fds, {}
        for fd in fds.values():
            os.close(fd)

"""DeepSpeed ZeRO-1/2/3 fp32 reconstruction, one parameter at a time, without DeepSpeed.

What `deepspeed/utils/zero_to_fp32.py` does (tests/fixtures/README_deepspeed_trl.md describes the layout), but
lazily: each parameter becomes a TensorRef whose load `pread`s just its own elements from the rank files'
fp32 partitions, so memory stays bounded by the writer's blocks, whatever the model size.

- ZeRO-1/2 (`single_partition_of_fp32_groups`): per param group, the ranks' partitions concatenated form one
  flat vector; the params of `param_shapes[g]` take consecutive runs of it in their stored order (round-robin
  reordering included); the tail is alignment padding (a multiple of 2 x world size).
- ZeRO-3 (`fp32_flat_groups`): per rank the sub-groups form one virtual vector; each param owns
  ceil(numel / W) elements at the same running offset on every rank; concatenated over ranks, trimmed.
- Frozen params from `frozen_param_fragments`, buffers from `module`, `shared_params` aliases.
"""
from __future__ import annotations

import bisect
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import RlexportError
from ...stream import Rows, Scratch, StreamLoader, block_shape, pread_into, row_numel
from ...tensors import TensorRef
from ..files import input_error
from ..pickles import PtFile, load_pt

OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
MODEL_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


# ---- flat runs of elements and lazy concatenations of them ----

@dataclass(frozen=True)
class Flat:
    """`numel` elements of `dtype` stored contiguously at byte `offset` of `path` (or held in `tensor`)."""

    path: Path
    offset: int
    numel: int
    dtype: torch.dtype
    tensor: torch.Tensor | None = None  # legacy (non-zip) files only: the flattened tensor, in memory


Piece = tuple[Flat, int, int]  # (run, first element, element count)


class Virtual:
    """Several Flats read as one vector."""

    def __init__(self, flats: list[Flat]):
        self.flats = flats
        self.starts = [0]
        for f in flats:
            self.starts.append(self.starts[-1] + f.numel)

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def take(self, start: int, count: int) -> list[Piece]:
        if start < 0 or start + count > self.numel:
            raise IndexError
        out = []
        i = bisect.bisect_right(self.starts, start) - 1
        while count > 0:
            local = start - self.starts[i]
            n = min(count, self.flats[i].numel - local)
            if n > 0:
                out.append((self.flats[i], local, n))
            start, count, i = start + n, count - n, i + 1
        return out


class Segments(StreamLoader):
    """A tensor made of pieces of flat runs, concatenated in order and viewed as `shape`; streams row blocks."""

    def __init__(self, pieces: list[Piece], dtype: torch.dtype, shape: tuple[int, ...]):
        self.pieces, self.dtype, self.shape = tuple(pieces), dtype, tuple(shape)
        self.starts = [0]
        for _, _, n in self.pieces:
            self.starts.append(self.starts[-1] + n)
        if self.starts[-1] != math.prod(self.shape):
            raise AssertionError(f"{self.starts[-1]} elements for shape {list(self.shape)}")

    def open(self) -> Rows:
        return _SegmentRows(self)


class _SegmentRows(Rows):
    def __init__(self, spec: Segments):
        self.spec = spec
        self.fds: dict[Path, int] = {}
        try:
            for flat, _, _ in spec.pieces:
                if flat.tensor is None and flat.path not in self.fds:
                    self.fds[flat.path] = os.open(flat.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self.close()
            raise input_error(flat.path, e) from None

    def rows(self, start: int, stop: int, scratch: Scratch) -> torch.Tensor:
        spec = self.spec
        out = scratch.take(spec.dtype, block_shape(spec.shape, start, stop))
        flat_out = out.view(-1)
        rn = row_numel(spec.shape)
        lo, hi = start * rn, stop * rn
        i = bisect.bisect_right(spec.starts, lo) - 1
        while lo < hi:
            flat, first, count = spec.pieces[i]
            skip = lo - spec.starts[i]
            n = min(count - skip, hi - lo)
            dst = flat_out[lo - start * rn: lo - start * rn + n]
            if flat.tensor is not None:
                dst.copy_(flat.tensor[first + skip: first + skip + n])
            else:
                try:
                    pread_into(self.fds[flat.path], dst, flat.offset + (first + skip) * flat.dtype.itemsize,
                               flat.path)
                except OSError as e:
                    raise input_error(flat.path, e) from None
            lo, i = lo + n, i + 1
        return out

    def close(self) -> None:
        fds, self.fds = self.fds, {}
        for fd in fds.values():
            os.close(fd)


# ---- the checkpoint files ----

@dataclass(frozen=True)
class Zero:
    """What a DeepSpeed tag folder holds, as lazy TensorRefs under the engine's parameter names."""

    tag_dir: Path
    stage: int
    world_size: int
    ds_version: str | None
    refs: tuple[TensorRef, ...]       # buffers, frozen and trainable params, shared aliases; module order
    frozen: frozenset[str]            # names of frozen params (PEFT: the base)
    module_names: tuple[str, ...]     # `module` keys (ordered as the model's state_dict)


def _bad(path: Path, why: str, hint: str = "the checkpoint is incomplete or damaged; copy the whole global_stepN/ "
                                             "folder again (every rank's files)") -> RlexportError:
    return RlexportError("corrupt-deepspeed", why, file=path, hint=hint)


def rank_files(tag_dir: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(optim files by rank, ZeRO-3 model-state files by rank, ZeRO-0/1/2 model-state file) of a tag folder."""
    optim: dict[int, Path] = {}
    z3: dict[int, Path] = {}
    plain: list[Path] = []
    mps = set()
    try:
        names = sorted(p.name for p in tag_dir.iterdir())
    except OSError as e:
        raise input_error(tag_dir, e) from None
    for name in names:
        for rx, table in ((OPTIM_RE, optim), (ZERO3_MODEL_RE, z3)):
            m = rx.match(name)
            if m:
                mps.add(int(m.group(2)))
                if int(m.group(1)) in table:
                    raise _bad(tag_dir / name, f"two files for rank {m.group(1)}",
                               "keep one optimizer file per rank (bf16_ and plain names mixed?)")
                table[int(m.group(1))] = tag_dir / name
        m = MODEL_RE.match(name)
        if m:
            mps.add(int(m.group(1)))
            plain.append(tag_dir / name)
    if mps - {0} or any(re.match(r"^layer_\d+-model_\d+-model_states\.pt$", n) for n in names):
        raise RlexportError("unsupported-deepspeed", "a model-parallel or pipeline-parallel DeepSpeed checkpoint "
                            "(mp_rank_01… / layer_NN files)", file=tag_dir,
                            hint="only data-parallel ZeRO-1/2/3 checkpoints are read; merge it with Megatron-"
                                 "DeepSpeed's own tools")
    for what, table in (("optimizer", optim), ("model-state", z3)):
        if table and sorted(table) != list(range(len(table))):
            missing = sorted(set(range(max(table) + 1)) - set(table))
            raise _bad(tag_dir, f"the {what} file of rank {missing[0]} is missing")
    return [optim[r] for r in sorted(optim)], [z3[r] for r in sorted(z3)], plain


def _shape(s) -> tuple[int, ...]:
    return tuple(int(x) for x in s)


def _flat(pt: PtFile, t: torch.Tensor, what: str) -> Flat:
    if not isinstance(t, torch.Tensor):
        raise pt.corrupt(f"{what} is not a tensor")
    if pt.records is None:
        return Flat(pt.path, 0, t.numel(), t.dtype, t.detach().reshape(-1))
    return Flat(pt.path, pt.offset(t, what), t.numel(), t.dtype)


def _ref(name: str, pieces: list[Piece], shape: tuple[int, ...], origin: Path) -> TensorRef:
    dtype = pieces[0][0].dtype if pieces else torch.float32
    if any(p[0].dtype != dtype for p in pieces):
        raise _bad(origin, f"parameter {name} is stored in several dtypes")
    return TensorRef(name, dtype, shape, Segments(pieces, dtype, shape), str(origin))


def _get(d, key, pt: PtFile, kind=None):
    if not isinstance(d, dict) or key not in d:
        raise pt.corrupt(f"no '{key}' entry: not a DeepSpeed checkpoint file")
    v = d[key]
    if kind is not None and not isinstance(v, kind):
        raise pt.corrupt(f"'{key}' is a {type(v).__name__}")
    return v


def read_zero(tag_dir: Path) -> Zero:
    """Describe a DeepSpeed tag folder (global_stepN/) as lazy fp32 TensorRefs. Reads only the pickles."""
    optim_files, z3_files, plain_files = rank_files(tag_dir)
    model_files = z3_files or plain_files
    if not model_files:
        raise _bad(tag_dir, "no *_model_states.pt file")
    ms0 = load_pt(model_files[0])
    state = ms0.obj
    param_shapes = _get(state, "param_shapes", ms0, list) if optim_files else []
    module = _get(state, "module", ms0, dict)
    ds_version = state.get("ds_version") if isinstance(state, dict) else None
    origin = optim_files[0] if optim_files else model_files[0]
    pieces: dict[str, tuple[list[Piece], tuple[int, ...]]] = {}
    frozen: set[str] = set()
    if not optim_files:
        # ZeRO-0 (or saved without optimizer states): `module` holds the whole weights.
        stage, world = 0, 1
        for name, t in module.items():
            if isinstance(t, torch.Tensor):
                if t.numel() == 0:
                    raise _bad(ms0.path, f"'{name}' is an empty placeholder and no *_optim_states.pt files are "
                                         "beside it")
                pieces[name] = ([(_flat(ms0, t, name), 0, t.numel())], _shape(t.shape))
    else:
        osds = []
        for f in optim_files:
            pt = load_pt(f)
            osd = _get(pt.obj, "optimizer_state_dict", pt, dict)
            osds.append((pt, osd))
        pt0, osd0 = osds[0]
        stage = int(osd0.get("zero_stage", 2 if "single_partition_of_fp32_groups" in osd0 else -1))
        count = _get(osd0, "partition_count", pt0)
        counts = list(count) if isinstance(count, (list, tuple)) else [count]
        if len(set(int(c) for c in counts)) != 1:
            raise RlexportError("unsupported-deepspeed", f"param groups partitioned over different world sizes "
                                f"{counts} (MoE expert parallelism)", file=pt0.path,
                                hint="convert it with DeepSpeed's zero_to_fp32.py")
        world = int(counts[0])
        if world != len(optim_files):
            raise _bad(tag_dir, f"the checkpoint was written by {world} ranks but {len(optim_files)} "
                                "*_optim_states.pt files are here")
        if stage in (1, 2):
            key = "single_partition_of_fp32_groups"
        elif stage == 3:
            key = "fp32_flat_groups"
        else:
            raise RlexportError("unsupported-deepspeed", f"unknown ZeRO stage {stage}", file=pt0.path,
                                hint="only ZeRO-1/2/3 checkpoints are read")
        flats = []
        for pt, osd in osds:
            groups = _get(osd, key, pt, (list, tuple))
            flats.append([_flat(pt, t, f"{key}[{i}]") for i, t in enumerate(groups)])
            if any(f.dtype != torch.float32 for f in flats[-1]):
                raise pt.corrupt(f"{key} are not float32")
        if stage <= 2:
            _zero12(pieces, param_shapes, flats, world, tag_dir)
        else:
            _zero3(pieces, param_shapes, flats, world, tag_dir)
        # frozen params (not in the optimizer), whole (ZeRO-1/2) or ceil-split over the ranks (ZeRO-3)
        fshapes = state.get("frozen_param_shapes") or {}
        if fshapes:
            states = [ms0] + [load_pt(f) for f in model_files[1:]] if stage == 3 else [ms0]
            if stage == 3 and len(states) != world:
                raise _bad(tag_dir, f"{len(states)} ZeRO-3 model-state files for {world} ranks")
            for name, shape in fshapes.items():
                shape = _shape(shape)
                n = math.prod(shape)
                got = []
                per = math.ceil(n / world) if stage == 3 else n
                for r, st in enumerate(states):
                    frag = _get(st.obj.get("frozen_param_fragments") or {}, name, st)
                    f = _flat(st, frag, f"frozen {name}")
                    take = min(per, n - r * per, f.numel)
                    if take > 0:
                        got.append((f, 0, take))
                if sum(p[2] for p in got) != n:
                    raise _bad(ms0.path, f"frozen parameter {name} has {sum(p[2] for p in got)} of {n} elements")
                pieces[name] = (got, shape)
                frozen.add(name)
        for name in state.get("buffer_names") or []:
            t = module.get(name)
            if isinstance(t, torch.Tensor) and t.numel():
                pieces[name] = ([(_flat(ms0, t, name), 0, t.numel())], _shape(t.shape))
    for alias, stored in (state.get("shared_params") or {}).items():
        if stored in pieces:
            pieces[alias] = pieces[stored]
    order = {n: i for i, n in enumerate(module)}
    names = sorted(pieces, key=lambda n: (order.get(n, len(order)), n))
    refs = tuple(_ref(n, pieces[n][0], pieces[n][1], origin) for n in names)
    return Zero(tag_dir, stage, world, ds_version, refs, frozenset(frozen), tuple(module))


def _zero12(pieces, param_shapes, flats, world: int, tag_dir: Path) -> None:
    if any(len(f) != len(param_shapes) for f in flats):
        raise _bad(tag_dir, f"{len(flats[0])} fp32 partition groups for {len(param_shapes)} param groups")
    align = 2 * world
    for g, shapes in enumerate(param_shapes):
        vec = Virtual([flats[r][g] for r in range(world)])
        off = 0
        for name, shape in shapes.items():
            shape = _shape(shape)
            n = math.prod(shape)
            if off + n > vec.numel:
                raise _bad(tag_dir, f"param group {g} ends before parameter {name}")
            pieces[name] = (vec.take(off, n), shape)
            off += n
        if align * math.ceil(off / align) != align * math.ceil(vec.numel / align):
            raise _bad(tag_dir, f"param group {g}: the parameters use {off} of {vec.numel} fp32 elements")


def _zero3(pieces, param_shapes, flats, world: int, tag_dir: Path) -> None:
    vecs = [Virtual(f) for f in flats]
    if len({v.numel for v in vecs}) != 1:
        raise _bad(tag_dir, "the ranks' fp32 partitions differ in size")
    off = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            shape = _shape(shape)
            n = math.prod(shape)
            per = math.ceil(n / world)
            if off + per > vecs[0].numel:
                raise _bad(tag_dir, f"the fp32 partitions end before parameter {name}")
            got = []
            for r in range(world):
                take = min(per, n - r * per)
                if take > 0:
                    got += vecs[r].take(off, take)
            pieces[name] = (got, shape)
            off += per
    if off != vecs[0].numel:
        raise _bad(tag_dir, f"the parameters use {off * world} of {vecs[0].numel * world} fp32 elements")

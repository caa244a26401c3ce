"""verl Megatron checkpoints (`MegatronCheckpointManager`): torch distributed checkpoints, read without Megatron.

Layout (verl 0.9.1): `<run>/latest_checkpointed_iteration.txt`, `<run>/global_step_N/actor/model/dist_ckpt/`
(megatron-core torch_dist: `.metadata`, `__R_K.distcp`, `common.pt`, `metadata.json`) beside `model/huggingface/`
(config, tokenizer) and `model/transformer_config.json`; older verl: `actor/dist_ckpt/`, `actor/huggingface/`.

`.metadata` pickles torch.distributed.checkpoint's `Metadata` (protocol 4, which torch's weights-only unpickler
cannot read): a `pickle.Unpickler` whose `find_class` allows only `_safe_classes` reads it. Each chunk of a tensor
is a byte range of a `.distcp` file: a `torch.save`d tensor (`torch.load(weights_only=True)` on meta says where
its storage is) or raw bytes. Megatron names map to llama-style HF names (Qwen2/3, Llama, Mistral): layers stacked
on a leading [num_layers] axis (verl's default) or per layer, `linear_qkv` fused per query group ([q heads; k; v]),
`linear_fc1` = [gate; up]. HF tensors are chunk byte ranges read in row blocks (dtensor.Sharded) on export.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import re
from pathlib import Path, PosixPath

import torch

from ..errors import RlexportError
from ..stream import StreamLoader
from ..tensors import TensorRef
from . import Piece, Source
from .access import input_error, quiet_torch_load, remember
from .common import has_tokenizer, resolve_base
from .dtensor import Part, Sharded
from .files import read_json
from .verl import ITER_FILE, ROLES, STEP_RE

HINT = "copy the whole dist_ckpt/ folder of the step again from the training machine"
LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")


def _safe_classes() -> dict:
    """The globals a torch_dist .metadata names (checked on torch 2.13 + megatron-core 0.16.1), nothing else."""
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


def load_metadata(path: Path):
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
        raise RlexportError("corrupt-pickle", f"unreadable .metadata ({why})", file=path, hint=HINT)
    return md


def dist_dir(role: Path) -> Path | None:
    try:
        return next((d for d in (role / "model" / "dist_ckpt", role / "dist_ckpt") if (d / ".metadata").is_file()))
    except (OSError, StopIteration):
        return None


def _steps(path: Path) -> list[Path]:
    try:
        found = [p for p in path.iterdir() if STEP_RE.match(p.name) and any(dist_dir(p / r) for r in ROLES)]
    except OSError:
        return []
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def with_tag(path: str | Path, tag: str) -> Path:
    """The run folder's `global_step_N/` for `--tag global_step_N` (or N)."""
    name = f"global_step_{tag}" if tag.isdigit() else tag
    found = [p for p in _steps(Path(path)) if p.name == name]
    if not found:
        have = ", ".join(p.name for p in _steps(Path(path))) or "none"
        raise RlexportError("tag-not-found", f"no verl Megatron checkpoint '{tag}' here (steps: {have})", file=path,
                            hint="pass one of the global_step_N/ folders listed with --tag")
    return found[0]


def detect(path: Path) -> bool:
    return bool(dist_dir(path) or any(dist_dir(path / r) for r in ROLES) or _steps(path))


def locate(path: Path) -> Path:
    for role in (path, *(path / r for r in ROLES)):
        if dist_dir(role):
            return role
    if (it := path / ITER_FILE).is_file():
        n = it.read_text(errors="replace").strip()
        if not n.isdigit() or not detect(path / f"global_step_{n}"):
            raise RlexportError("tag-not-found", f"{ITER_FILE} names step {n!r} but global_step_{n}/ holds no verl "
                                "Megatron checkpoint", file=it, hint="copy that step's folder, or pass another step")
        return locate(path / f"global_step_{n}")
    if len(steps := _steps(path)) == 1:
        return locate(steps[0])
    raise RlexportError("several-tags", f"{len(steps)} verl checkpoints and no {ITER_FILE} "
                        f"({', '.join(s.name for s in steps)})", file=path, hint="pass one global_step_N/ folder")


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


def _chunk_offset(path: Path, info, dtype: torch.dtype, sizes: tuple[int, ...], name: str) -> int:
    """The file offset of a chunk's contiguous bytes (raw, or the storage of the torch.save'd tensor)."""
    raw = math.prod(sizes) * dtype.itemsize
    if getattr(info, "transform_descriptors", None):
        raise RlexportError("unsupported-checkpoint", f"'{name}' is stored with transforms "
                            f"{info.transform_descriptors}", file=path, hint="save it without storage transforms")

    def bad(why: str) -> RlexportError:
        return RlexportError("corrupt-checkpoint", f"unreadable chunk of '{name}' ({why})", file=path, hint=HINT)
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
                                "tensor; nothing in it was run", file=path, hint=HINT) from None
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


class _Lazy(StreamLoader):
    """A Hugging Face tensor cut from Megatron chunks; the chunks' zips are read when it is first opened."""

    def __init__(self, pieces, dtype, shape):
        self.pieces, self.dtype, self.shape, self._parts = pieces, dtype, tuple(shape), None

    def open(self):
        if self._parts is None:
            parts, size = [], self.dtype.itemsize
            for file, info, sizes, inner, starts, layer, lo, hi, out_row, key in self.pieces:
                off = _chunk_offset(file, info, self.dtype, sizes, key) + layer * math.prod(inner) * size
                row = math.prod(inner[1:]) * size
                parts.append(Part(file, off + lo * row, (out_row, *starts), (hi - lo, *inner[1:])))
            self._parts = tuple(parts)
        return Sharded(self._parts, self.dtype, self.shape).open()


def _slices(cfg: dict) -> dict:
    """Megatron param suffix -> [(HF suffix, row ranges of the layer's tensor)]; None ranges: all rows."""
    nh, ng = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    qn, gs, ff = nh // ng * hd, (nh // ng + 2) * hd, cfg["intermediate_size"]
    qkv = [(f"self_attn.{p}_proj", [(g * gs + a, g * gs + b) for g in range(ng)])
           for p, (a, b) in (("q", (0, qn)), ("k", (qn, qn + hd)), ("v", (qn + hd, gs)))]
    pre, post = "input_layernorm", "post_attention_layernorm"  # norms: fused into linear_qkv / fc1, or modules
    out = {m: [(h + ".weight", None)] for m, h in (
        ("self_attention.linear_qkv.layer_norm_weight", pre), ("input_layernorm.weight", pre),
        ("mlp.linear_fc1.layer_norm_weight", post), ("pre_mlp_layernorm.weight", post),
        *((f"self_attention.{x}_layernorm.weight", f"self_attn.{x}_norm") for x in "qk"))}
    for kind in ("weight", "bias"):
        out[f"self_attention.linear_qkv.{kind}"] = [(f"{h}.{kind}", r) for h, r in qkv]
        out[f"self_attention.linear_proj.{kind}"] = [(f"self_attn.o_proj.{kind}", None)]
        out[f"mlp.linear_fc1.{kind}"] = [(f"mlp.gate_proj.{kind}", [(0, ff)]), (f"mlp.up_proj.{kind}", [(ff, 2 * ff)])]
        out[f"mlp.linear_fc2.{kind}"] = [(f"mlp.down_proj.{kind}", None)]
    return out


def megatron_refs(ddir: Path, config: dict) -> list[TensorRef]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = load_metadata(ddir / ".metadata")
    if str(config.get("model_type")) not in LLAMA_STYLE:
        raise RlexportError("unsupported-architecture", f"no Megatron name mapping for model_type "
                            f"'{config.get('model_type')}' (only {', '.join(LLAMA_STYLE)})", file=ddir,
                            hint="convert the checkpoint with verl's model merger (--backend megatron)")
    infos: dict[str, dict] = {}
    for idx, info in md.storage_data.items():
        infos.setdefault(idx.fqn, {})[tuple(idx.offset or ())] = info
    for rel in sorted({i.relative_path for found in infos.values() for i in found.values()}):
        if not (ddir / rel).is_file():
            raise RlexportError("missing-file", f"{rel} of the distributed checkpoint is missing", file=ddir / rel,
                                hint=HINT)
        remember(ddir / rel)  # export refuses it if it changes meanwhile
    slices, vocab, refs = _slices(config), config.get("vocab_size"), []
    for key, meta in md.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata) or not key.startswith(("embedding.", "decoder.", "output_")):
            continue  # _extra_state / rng_state bytes, optimizer.* states
        shape, dtype = tuple(meta.size), meta.properties.dtype
        m = re.fullmatch(r"decoder\.layers\.(?:(\d+)\.)?(.+)", key)
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            hf = "model.embed_tokens.weight" if key.startswith("emb") else "lm_head.weight"
            outs = [(None, hf, [(0, min(shape[0], vocab or shape[0]))])]  # drop Megatron's vocab padding
        elif key == "decoder.final_layernorm.weight":
            outs = [(None, "model.norm.weight", None)]
        elif m and m.group(2) in slices:
            layers = [int(m.group(1))] if m.group(1) else list(range(shape[0]))
            outs = [(i, f"model.layers.{i}.{h}", r) for i in layers for h, r in slices[m.group(2)]]
        else:
            raise RlexportError("unsupported-checkpoint", f"no Hugging Face name for Megatron tensor '{key}'",
                                file=ddir / ".metadata", hint="convert it with verl's model merger")
        stacked = m is not None and m.group(1) is None  # else a virtual [1] layer axis
        inner, chunks = (shape[1:] if stacked else shape), []
        for c in meta.chunks:  # a chunk without a storage entry leaves a hole, reported below
            offs, sizes = tuple(c.offsets), tuple(c.sizes)
            if (info := infos.get(key, {}).get(offs)) is not None:
                chunks.append((offs if stacked else (0, *offs), sizes if stacked else (1, *sizes), sizes, info))
        for layer, hf, ranges in outs:
            at, pieces, rows = (layer if stacked else 0), [], 0
            for a, b in ranges or [(0, inner[0])]:
                for offs, vs, sizes, info in chunks:
                    lo, hi = max(a, offs[1]), min(b, offs[1] + vs[1])
                    if offs[0] <= at < offs[0] + vs[0] and lo < hi:
                        pieces.append((ddir / info.relative_path, info, sizes, vs[1:], offs[2:], at - offs[0],
                                       lo - offs[1], hi - offs[1], rows + lo - a, key))
                rows += b - a
            out_shape = (rows, *inner[1:])
            if sum((p[7] - p[6]) * math.prod(p[3][1:]) for p in pieces) != math.prod(out_shape):
                raise RlexportError("corrupt-checkpoint", f"the stored chunks of '{key}' do not cover {hf} "
                                    f"{list(out_shape)}", file=ddir / ".metadata", hint=HINT)
            refs.append(TensorRef(hf, dtype, out_shape, _Lazy(tuple(pieces), dtype, out_shape),
                                  str(pieces[0][0] if pieces else ddir)))
    return sorted(refs, key=lambda r: (int(r.name.split(".")[2]) if r.name.startswith("model.layers.") else
                                       -1 if "embed" in r.name else 1 << 30, r.name))


def read(path: Path, *, base=None) -> Source:
    role = locate(path)
    ddir = dist_dir(role)
    hf = next((d for d in (role / "model" / "huggingface", role / "huggingface") if (d / "config.json").is_file()),
              None)
    base_dir = resolve_base(base, relative_to=role, explicit=True) if base is not None else None
    if (config_dir := hf or base_dir) is None:
        raise RlexportError("missing-config", "the verl Megatron checkpoint has no model/huggingface/config.json",
                            file=role, hint="pass --base with the model the run started from (config and tokenizer)")
    config = read_json(config_dir / "config.json")
    if role.name == "critic":
        raise RlexportError("unsupported-checkpoint", "a verl Megatron critic (value model) is not exported yet",
                            file=role, hint="export the actor/ folder of the step")
    refs, step = megatron_refs(ddir, config), role.parent
    tok = tuple(d for d in (hf, base_dir) if d is not None and has_tokenizer(d))
    pieces = tuple(Piece("checkpoint", s, "another verl step; export it by passing its path")
                   for s in (_steps(step.parent) if STEP_RE.match(step.name) else []) if s != step)
    return Source(kind="verl-megatron", path=path, producer="verl", stage=None, config=config, config_dir=config_dir,
                  weights=tuple(refs), tokenizer_dirs=tok, base_dir=base_dir, pieces=pieces,
                  base_config=read_json(base_dir / "config.json") if base_dir else None)

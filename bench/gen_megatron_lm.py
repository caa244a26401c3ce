"""A Megatron-LM `save_checkpoint` torch_dist checkpoint (TP=2 x PP=2, bf16, distributed optimizer) of a bench
geometry, written tensor by tensor, no Megatron installed and no model in memory.

    .venv/bin/python bench/gen_megatron_lm.py --geometry 1.5b [--root DIR]
    .venv/bin/python bench/gen_megatron_lm.py --check      # tiny geometry vs tests/fixtures/megatron_lm_iter_qwen2

Writes ROOT/megatron-lm-<geometry>/ with `ckpt/` (a save root: `latest_checkpointed_iteration.txt` = 10,
`iter_0000010/` with `.metadata`, `__R_K.distcp` for 4 ranks x 2 files, `common.pt`, `metadata.json`) and `base/`
(the geometry's config.json + generation_config.json, and the tiny test tokenizer of lf_ppo_full_qwen2/base: the
`--base` a slime user keeps). It reproduces what tests/fixtures/megatron_lm_iter_qwen2 (made by Megatron-LM's own
save_checkpoint at slime's pin) shows:
  * keys: GPTModel names with the layers stacked on a leading [num_layers] axis (global layer numbers), one chunk
    per layer; linear_qkv rows (per query group [q; k; v]) and embedding/output rows split by TP, linear_proj and
    linear_fc2 columns split by TP, linear_fc1 = [gate; up] with each TP rank's gate and up rows as two chunks;
    the norms (`*.layer_norm_weight`, final_layernorm) saved once by TP rank 0 of their stage. The vocabulary is
    padded to a multiple of 128 x TP. A tied geometry (1.5B) has no output_layer key (Megatron's tied output
    weight on the last stage is not the main replica, so it is not saved).
  * ranks: global rank = tp + 2 * pp; each rank's items split over 2 files as megatron's FileSystemWriterAsync
    does (bytes items round-robin, then tensors by size, largest first, into the lighter file), each tensor chunk
    a `torch.save`d tensor at its `_StorageInfo` offset; `.metadata` = torch.distributed.checkpoint's Metadata
    (with megatron's `all_local_plans`), pickled as DCP pickles it.
  * the distributed optimizer: per rank (`dp_group_idx_<rank>`, DP=1) and DDP bucket (40M parameters, Megatron's
    default for the distributed optimizer) fp32 `param`, `exp_avg`, `exp_avg_sq` of the bucket's size, one chunk
    per parameter, in the fixture's order (last stage: output layer and final norm first; layers last to first;
    first stage: embedding last). 12 bytes per parameter, 6x the bf16 weights.
  * byte entries (`_extra_state`, `rng_state`, optimizer param groups / bucket sizes): the fixture's own bytes.
Differences, on purpose: the optimizer chunks are sparse holes of the size a torch.save'd fp32 tensor of that
numel takes (the file is seeked past them), so the checkpoint has its real file sizes but uses only the weights'
disk space; neither rlexport nor slime's converter reads them. Buckets are not padded. `common.pt` holds a plain
argparse.Namespace: the fixture's plain-valued args (Megatron-class values dropped) with the geometry's numbers.
Weights: N(0, 0.02) in bf16, each chunk from its own generator seeded with (seed, its index).
`--zero-weights` (the 7B run on a disk too small for a 15 GB input and a 15 GB output): every weight is 0 and its
bytes are a hole too (the torch.save'd chunks stay valid zips); the files, chunks and reads are the same.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import shutil
import sys
import time
import uuid
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gen import DEFAULT_ROOT, GEOMETRIES, Geometry  # noqa: E402

FIXTURE = HERE.parent / "tests/fixtures/megatron_lm_iter_qwen2"
FIX_ITER = FIXTURE / "ckpt/iter_0000010"
TOKENIZER = HERE.parent / "tests/fixtures/lf_ppo_full_qwen2/base"
TP, PP, ITERATION, BUCKET = 2, 2, 10, 40_000_000
TINY = Geometry("tiny (the fixture's)", 128, 256, 2, 2, 2, 320, False, 0)
BF16 = TensorProperties(dtype=torch.bfloat16)
FP32 = TensorProperties(dtype=torch.float32)
OPT = "optimizer.distributed.dp_group_idx_{r}.gbuf_idx_0.dtype_(torch.bfloat16, torch.float32).bucket_idx_{b}.{s}"


def padded_vocab(g: Geometry) -> int:
    m = 128 * TP
    return math.ceil(g.vocab / m) * m


def _save_overhead() -> int:
    """Bytes torch.save adds around an fp32 tensor's data (constant for one dtype: 1577 in the fixture)."""
    b = io.BytesIO()
    torch.save(torch.zeros(16384), b)
    return b.tell() - 16384 * 4


class Item:
    """One write item of a rank: a chunk of a tensor (model or optimizer) or a byte entry."""

    def __init__(self, fqn, *, offsets=None, sizes=None, shape=None, props=BF16, index=None, data=None, hole=False):
        self.fqn, self.offsets, self.sizes, self.shape = fqn, offsets, sizes, shape
        self.props, self.index, self.data, self.hole = props, index, data, hole

    @property
    def is_bytes(self) -> bool:
        return self.sizes is None

    @property
    def nbytes(self) -> int:
        return len(self.data) if self.is_bytes else math.prod(self.sizes) * self.props.dtype.itemsize

    def write_item(self) -> WriteItem:
        if self.is_bytes:
            return WriteItem(MetadataIndex(self.fqn), WriteItemType.BYTE_IO)
        chunk = ChunkStorageMetadata(torch.Size(self.offsets), torch.Size(self.sizes))
        return WriteItem(MetadataIndex(self.fqn, torch.Size(self.offsets), self.index), WriteItemType.SHARD,
                         tensor_data=TensorWriteData(chunk, self.props, torch.Size(self.shape)))


def _fixture_bytes() -> dict[str, bytes]:
    """The fixture's byte entries (_extra_state, rng_state, optimizer bytes), by key."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from rlexport.formats.dcp import load_metadata
    md = load_metadata(FIX_ITER / ".metadata")
    out = {}
    for idx, info in md.storage_data.items():
        if isinstance(md.state_dict_metadata[idx.fqn], BytesStorageMetadata):
            with open(FIX_ITER / info.relative_path, "rb") as f:
                f.seek(info.offset)
                out[idx.fqn] = f.read(info.length)
    return out


def rank_items(g: Geometry, tp: int, pp: int, fx: dict[str, bytes]) -> list[Item]:
    """A rank's write items in its save plan's order (model, optimizer bytes, optimizer tensors, rng_state)."""
    h, ffn, hd = g.hidden, g.intermediate, g.head_dim
    groups, qpg = g.kv_heads, g.heads // g.kv_heads
    qkv = groups * (qpg + 2) * hd
    per, L, V = g.layers // PP, g.layers, padded_vocab(g)
    first, last = pp == 0, pp == PP - 1
    layers = range(pp * per, (pp + 1) * per)
    items, params = [], []  # params: (name, numel) of this rank, in DDP registration order

    def add(fqn, shape, offsets, sizes, param=None):
        items.append(Item(fqn, offsets=offsets, sizes=sizes, shape=shape))
        if param:
            params.append((param, math.prod(sizes)))

    if first:
        add("embedding.word_embeddings.weight", [V, h], [tp * V // TP, 0], [V // TP, h], "emb")
    d = "decoder.layers."
    main = tp == 0  # replicated tensors: saved by TP rank 0 only
    for n in layers:
        if main:
            add(d + "self_attention.linear_qkv.layer_norm_weight", [L, h], [n, 0], [1, h])
    for n in layers:
        add(d + "self_attention.linear_proj.weight", [L, h, h], [n, 0, tp * h // TP], [1, h, h // TP])
    if main:
        items.append(Item(d + f"self_attention.linear_proj._extra_state/shard_{pp}_{PP}",
                          data=fx[d + f"self_attention.linear_proj._extra_state/shard_{pp % 2}_2"]))
    for n in layers:
        add(d + "self_attention.linear_qkv.weight", [L, qkv, h], [n, tp * qkv // TP, 0], [1, qkv // TP, h])
    for n in layers:
        add(d + "self_attention.linear_qkv.bias", [L, qkv], [n, tp * qkv // TP], [1, qkv // TP])
    if main:
        items.append(Item(d + f"self_attention.linear_qkv._extra_state/shard_{pp}_{PP}",
                          data=fx[d + f"self_attention.linear_qkv._extra_state/shard_{pp % 2}_2"]))
        for n in layers:
            add(d + "mlp.linear_fc1.layer_norm_weight", [L, h], [n, 0], [1, h])
    for n in layers:
        for part in (0, 1):  # gate rows, then up rows of this TP rank
            add(d + "mlp.linear_fc1.weight", [L, 2 * ffn, h], [n, part * ffn + tp * ffn // TP, 0], [1, ffn // TP, h])
    if main:
        items.append(Item(d + f"mlp.linear_fc1._extra_state/shard_{pp}_{PP}",
                          data=fx[d + f"mlp.linear_fc1._extra_state/shard_{pp % 2}_2"]))
    for n in layers:
        add(d + "mlp.linear_fc2.weight", [L, h, ffn], [n, 0, tp * ffn // TP], [1, h, ffn // TP])
    if main:
        items.append(Item(d + f"mlp.linear_fc2._extra_state/shard_{pp}_{PP}",
                          data=fx[d + f"mlp.linear_fc2._extra_state/shard_{pp % 2}_2"]))
    if last:
        if main:
            add("decoder.final_layernorm.weight", [h], [0], [h])
        if not g.tied:
            add("output_layer.weight", [V, h], [tp * V // TP, 0], [V // TP, h])

    # DDP's parameter order in the grad buffer (the fixture's): per layer, last layer first:
    # fc2, fc1, fc1 norm, qkv bias, qkv, proj, qkv norm; output layer and final norm first, embedding last.
    numel = {"qkv": qkv // TP * h, "bias": qkv // TP, "proj": h * h // TP, "fc1": 2 * ffn // TP * h,
             "fc2": h * ffn // TP, "norm": h}
    order = []
    if last:
        order += ([] if g.tied else [V // TP * h]) + [h]
    for _ in layers:
        order += [numel[k] for k in ("fc2", "fc1", "norm", "bias", "qkv", "proj", "norm")]
    if first:
        order.append(V // TP * h)
    if g.tied and last and not first:  # Megatron keeps the tied output weight's gradient on the last stage
        order.insert(0, V // TP * h)
    buckets, cur = [], []
    for n in order:
        cur.append(n)
        if sum(cur) >= BUCKET:
            buckets.append(cur)
            cur = []
    if cur:
        buckets.append(cur)
    r = tp + TP * pp
    o = "optimizer.distributed.dp_group_idx_{r}."
    for what in ("optimizer/shard_0_1", "per_bucket_numel/shard_0_1", "per_bucket_numel_unpadded/shard_0_1"):
        items.append(Item(o.format(r=r) + what, data=fx[o.format(r=0) + what]))
    for b, sizes in enumerate(buckets):
        total = sum(sizes)
        for s in ("param", "exp_avg", "exp_avg_sq"):
            off = 0
            for i, n in enumerate(sizes):
                items.append(Item(OPT.format(r=r, b=b, s=s), offsets=[off], sizes=[n], shape=[total], props=FP32,
                                  index=i, hole=True))
                off += n
    items.append(Item(f"rng_state/shard_{pp}.{tp}_{PP}.{TP}", data=fx[f"rng_state/shard_{pp}.{tp}_2.2"]))
    return items


def split(items: list[Item], bins: int = 2) -> list[list[Item]]:
    """megatron FileSystemWriterAsync._split_by_size_and_type: bytes round-robin, then tensors largest first."""
    out, sizes = [[] for _ in range(bins)], [0] * bins
    for i, it in enumerate(x for x in items if x.is_bytes):
        out[i % bins].append(it)
    for it in sorted((x for x in items if not x.is_bytes), key=lambda x: x.nbytes, reverse=True):
        k = min(range(bins), key=lambda j: sizes[j])
        out[k].append(it)
        sizes[k] += it.nbytes
    return out


def chunk_tensor(it: Item, seed: int, key: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + key)
    if "layer_norm" in it.fqn or "final_layernorm" in it.fqn:
        return (1 + 0.1 * torch.randn(it.sizes, generator=gen)).to(torch.bfloat16)
    return (0.02 * torch.randn(it.sizes, generator=gen)).to(torch.bfloat16)


def _write_sparse(f, buf: memoryview, block: int = 1 << 20) -> None:
    """Write `buf`, seeking past all-zero blocks (holes): the file reads back the same bytes."""
    zero = bytes(block)
    for i in range(0, len(buf), block):
        part = buf[i:i + block]
        if part == zero[:len(part)]:
            f.seek(len(part), os.SEEK_CUR)
        else:
            f.write(part)


def write_iter(g: Geometry, it_dir: Path, seed: int = 0, *, zero_weights: bool = False) -> None:
    fx = _fixture_bytes()
    overhead = _save_overhead()
    state, storage, plans = {}, {}, []
    key = 0
    for r in range(TP * PP):
        tp, pp = r % TP, r // TP
        items = rank_items(g, tp, pp, fx)
        plans.append(SavePlan([it.write_item() for it in items]))
        for it in items:
            if it.is_bytes:
                state.setdefault(it.fqn, BytesStorageMetadata())
            else:
                md = state.setdefault(it.fqn, TensorStorageMetadata(it.props, torch.Size(it.shape), []))
                md.chunks.append(ChunkStorageMetadata(torch.Size(it.offsets), torch.Size(it.sizes)))
        for k, part in enumerate(split(items)):
            rel = f"__{r}_{k}.distcp"
            with open(it_dir / rel, "wb") as f:
                for it in part:
                    start = f.tell()
                    if it.is_bytes:
                        f.write(it.data)
                    elif it.hole:  # fp32 optimizer state: never read; leave a hole of its torch.save size
                        f.seek(start + it.nbytes + overhead)
                    else:
                        b = io.BytesIO()
                        if zero_weights:  # a valid torch.save'd zip whose data bytes are a hole
                            torch.save(torch.zeros(it.sizes, dtype=torch.bfloat16), b)
                            _write_sparse(f, b.getbuffer())
                        else:
                            torch.save(chunk_tensor(it, seed, key), b)
                            f.write(b.getbuffer())
                        key += 1
                        del b
                    mi = MetadataIndex(it.fqn, None if it.is_bytes else torch.Size(it.offsets), it.index)
                    storage[mi] = _StorageInfo(rel, start, f.tell() - start)
                f.truncate(f.tell())
    md = Metadata(state, planner_data=None, storage_data=storage,
                  storage_meta=StorageMeta(checkpoint_id=f"ckpt/iter_{ITERATION:07d}", save_id=str(uuid.uuid4()),
                                           modules=[]))
    md.all_local_plans = plans  # megatron's save adds the ranks' plans
    with open(it_dir / ".metadata", "wb") as f:
        pickle.dump(md, f)  # DCP's FileSystemWriter.finish: pickle.dump(metadata, stream) (protocol 4 on 3.11)


class _Dummy:
    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        pass


class _Unpickler(pickle.Unpickler):
    """The fixture's common.pt: Megatron classes replaced (as slime's converter does), an allowlist for the rest."""

    def find_class(self, module, name):
        if module.startswith("megatron"):
            return _Dummy
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("signal", "Signals"):
            import signal
            return signal.Signals
        raise pickle.UnpicklingError(f"{module}.{name} is not expected in common.pt")


class _PickleModule:
    Unpickler = _Unpickler
    load = pickle.load
    __name__ = "pickle"


def write_common(g: Geometry, it_dir: Path) -> None:
    common = torch.load(FIX_ITER / "common.pt", weights_only=False, pickle_module=_PickleModule)
    a = common["args"]
    plain = (int, float, str, bool, type(None), torch.dtype)
    for k, v in list(vars(a).items()):
        if not (isinstance(v, plain) or isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v)):
            delattr(a, k)
    for k, v in {"num_layers": g.layers, "hidden_size": g.hidden, "ffn_hidden_size": g.intermediate,
                 "num_attention_heads": g.heads, "num_query_groups": g.kv_heads, "kv_channels": g.head_dim,
                 "padded_vocab_size": padded_vocab(g), "seq_length": 4096, "max_position_embeddings": 32768,
                 "untie_embeddings_and_output_weights": not g.tied, "iteration": ITERATION,
                 "rotary_base": 1000000}.items():
        setattr(a, k, v)
    out = {"args": a, "checkpoint_version": common["checkpoint_version"], "iteration": ITERATION,
           "num_floating_point_operations_so_far": 0}
    torch.save(out, it_dir / "common.pt")


def make(g: Geometry, folder: Path, seed: int = 0, *, zero_weights: bool = False) -> Path:
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    it_dir = folder / "ckpt" / f"iter_{ITERATION:07d}"
    it_dir.mkdir(parents=True)
    base = folder / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(g.config(), indent=2))
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": g.eos, "eos_token_id": g.eos}))
    for f in TOKENIZER.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, base / f.name)
    write_iter(g, it_dir, seed, zero_weights=zero_weights)
    write_common(g, it_dir)
    shutil.copy(FIX_ITER / "metadata.json", it_dir / "metadata.json")
    (folder / "ckpt" / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    (folder / ".complete").write_text("ok")
    return folder


def disk_use(folder: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of a folder's files."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_blocks * 512 for p in files)


def check() -> None:
    """The tiny geometry against the real fixture: same tensors, shapes, dtypes, chunks and byte entries."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from rlexport.formats.dcp import load_metadata
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"gen-megatron-lm-check-{os.getpid()}"
    try:
        make(TINY, out)
        a = load_metadata(FIX_ITER / ".metadata")
        b = load_metadata(out / "ckpt" / f"iter_{ITERATION:07d}" / ".metadata")

        def desc(md):
            d = {}
            for k, v in md.state_dict_metadata.items():
                if isinstance(v, BytesStorageMetadata):
                    d[k] = "bytes"
                else:
                    d[k] = (v.properties.dtype, tuple(v.size),
                            sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks))
            return d
        da, db = desc(a), desc(b)
        bad = [k for k in da.keys() | db.keys() if da.get(k) != db.get(k)]
        for k in bad:
            print("differs:", k, da.get(k), db.get(k))
        files = lambda md: sorted({i.relative_path for i in md.storage_data.values()})  # noqa: E731
        print(f"{len(da)} keys, {len(bad)} differ; files {files(a) == files(b)}; "
              f"storage entries {len(a.storage_data)} vs {len(b.storage_data)}")
        same_file = sum(a.storage_data[k].relative_path == b.storage_data[k].relative_path
                        for k in a.storage_data if k in b.storage_data)
        rng = lambda md, k: (md.storage_data[k].offset, md.storage_data[k].length)  # noqa: E731
        same_range = sum(rng(a, k) == rng(b, k) for k in a.storage_data if k in b.storage_data)
        print(f"storage entries in the same file as the fixture's: {same_file}/{len(a.storage_data)}, "
              f"at the same offset and length: {same_range}/{len(a.storage_data)}")
        sys.exit(1 if bad else 0)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="1.5b")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--check", action="store_true", help="the tiny geometry against the real fixture, then exit")
    ap.add_argument("--zero-weights", action="store_true",
                    help="weights all zero, their bytes holes too (a disk too small for input + output)")
    args = ap.parse_args()
    if args.check:
        check()
    t = time.time()
    folder = make(GEOMETRIES[args.geometry], args.root / f"megatron-lm-{args.geometry}",
                  zero_weights=args.zero_weights)
    if args.zero_weights:
        (folder / ".zero-weights").write_text("weights are zeros (holes)")
    apparent, allocated = disk_use(folder)
    print(f"{folder} in {time.time() - t:.0f}s: {apparent / 1e9:.2f} GB of files, {allocated / 1e9:.2f} GB on disk")


if __name__ == "__main__":
    main()

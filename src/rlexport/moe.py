"""Mixture-of-experts blocks: the fused expert tensors of transformers >= 5 split into the hub checkpoint's
per-expert tensors (lazily, one expert's rows per output tensor), the experts checked against config.json, and
the facts `inspect` shows. What each family's hub checkpoint looks like is data in archs.py (archs.Moe).

transformers 5 holds `<block>.experts.gate_up_proj` [E, 2I, H] (gate rows first, then up) and
`<block>.experts.down_proj` [E, H, I]; its save_pretrained writes `<block>.experts.<e>.gate_proj.weight` [I, H],
`up_proj` [I, H], `down_proj` [H, I] (Mixtral: block_sparse_moe.experts.<e>.w1 / w3 / w2). Trainers that save
the state dict (verl, Megatron mapped to HF names) keep the fused form.
"""
from __future__ import annotations

import re
import threading

import torch

from . import archs
from .errors import RlexportError
from .stream import FileSlice, Rows, Scratch, StreamLoader
from .tensors import TensorRef

EXPERT_RE = re.compile(r"^(?P<block>.+)\.experts\.(?P<e>\d+)\.(?P<part>[^.]+)\.weight$")
FUSED_RE = re.compile(r"^(?P<block>.+)\.experts\.(?P<param>[^.]+)$")
HINT = "export the checkpoint of the run as saved (every rank file / shard), with the config.json it was saved with"


def _text(config: dict) -> dict:
    return config["text_config"] if isinstance(config.get("text_config"), dict) and "vocab_size" not in config \
        else config


def moe_of(config: dict) -> archs.Moe | None:
    return archs.arch_of(config).moe


def expert_count(config: dict) -> int | None:
    """The number of routed experts config.json declares, under any of its family's spellings."""
    moe, text = moe_of(config), _text(config)
    for key in (moe.count_key, *moe.aliases) if moe else ():
        if isinstance(text.get(key), int):
            return text[key]
    return None


def hub_config(cfg: dict) -> dict:
    """config.json with the expert count under the key the family's hub config uses (transformers 4.x reads only
    that one: a Qwen3-MoE config saved by transformers 5 says num_local_experts, which 4.x ignores, falling back
    to 128 experts). Edits `cfg` in place and returns it."""
    moe, text = moe_of(cfg), _text(cfg)
    n = expert_count(cfg)
    if moe is None or n is None:
        return cfg
    for key in moe.aliases:
        text.pop(key, None)
    text[moe.count_key] = n
    return cfg


# ---- fused -> per expert --------------------------------------------------------------------------------------

def to_per_expert(refs: list[TensorRef], config: dict) -> list[TensorRef]:
    """The hub layout of a MoE family whose hub checkpoints are per expert: fused expert tensors split, the
    block renamed (Mixtral: mlp -> block_sparse_moe). Other families and tensors pass unchanged; then the
    experts are checked against config.json (a missing expert, a count or router that disagrees)."""
    arch = archs.arch_of(config)
    if arch.moe is None:
        return refs
    out: list[TensorRef] = []
    for ref in refs:
        name = _rename(arch, ref.name)
        m = FUSED_RE.match(name)
        spec = next((x for x in arch.experts if m and x.param == m["param"]), None)
        if spec is None or not arch.moe.per_expert:
            out.append(ref.renamed(name) if name != ref.name else ref)
            continue
        if len(ref.shape) != 3 or ref.shape[1] % len(spec.parts):
            raise RlexportError("moe-expert-shape", f"'{ref.name}' has shape {list(ref.shape)}, not [experts, "
                                f"{' + '.join(spec.parts)} rows, in]", file=ref.origin, hint=HINT)
        if expert_count(config) not in (None, ref.shape[0]):
            raise _count(ref.name, ref.shape[0], expert_count(config), arch.moe, ref.origin)
        out.extend(_split(ref, m["block"], spec))
    check_experts(out, config)
    return out


def _rename(arch: archs.Arch, name: str) -> str:
    for in_memory, on_disk in arch.renames:
        name = name.replace(in_memory, on_disk)
    return name


def _split(ref: TensorRef, block: str, spec: archs.Experts) -> list[TensorRef]:
    n, rows, cols = ref.shape
    part_rows = rows // len(spec.parts)
    whole = _Whole(ref.load, n * len(spec.parts))
    out = []
    for e in range(n):
        for i, part in enumerate(spec.parts):
            lo, hi = i * part_rows, (i + 1) * part_rows
            out.append(TensorRef(f"{block}.experts.{e}.{part}.weight", ref.dtype, (part_rows, cols),
                                 _expert_load(ref, e, lo, hi, whole), ref.origin))
    return out


def _expert_load(ref: TensorRef, e: int, lo: int, hi: int, whole: "_Whole"):
    """Rows [lo, hi) of expert e, read from where they are stored: a slice of the file when they lie there
    verbatim (a safetensors tensor, or a rank file's shard holding whole experts), else one expert's rows of a
    streamable loader, else a slice of the whole tensor (loaded once for all its slices)."""
    load, (n, rows, cols) = ref.load, ref.shape
    shape = (hi - lo, cols)
    item = ref.dtype.itemsize
    if type(load) is FileSlice:
        return FileSlice(load.path, load.offset + (e * rows + lo) * cols * item, ref.dtype, shape,
                         on_error=load.on_error, name=load.name)
    from .formats.access import input_error
    from .formats.dtensor import Sharded
    if isinstance(load, Sharded):  # verl / FSDP rank shards, split along the expert axis
        for p in load.parts:
            if p.starts[0] <= e < p.starts[0] + p.shape[0] and tuple(p.shape[1:]) == (rows, cols):
                return FileSlice(p.path, p.offset + ((e - p.starts[0]) * rows + lo) * cols * item, ref.dtype,
                                 shape, on_error=lambda err, f=p.path: input_error(f, err))
    if isinstance(load, StreamLoader) and load.streamable:
        return ExpertRows(load, e, lo, hi, ref.dtype, shape)
    return lambda: whole.slice(e, lo, hi)


class ExpertRows(StreamLoader):
    """Rows [lo, hi) of expert e of a streamable [E, R, C] loader: reads that expert's rows only."""

    def __init__(self, inner: StreamLoader, e: int, lo: int, hi: int, dtype: torch.dtype, shape: tuple[int, ...]):
        self.inner, self.e, self.lo, self.hi, self.dtype, self.shape = inner, e, lo, hi, dtype, tuple(shape)

    def prefetch_hint(self, start: int, stop: int) -> None:
        self.inner.prefetch_hint(self.e, self.e + 1)

    def open(self) -> Rows:
        return _ExpertRows(self)


class _ExpertRows(Rows):
    def __init__(self, spec: ExpertRows):
        r = spec.inner.open()
        try:  # one expert's rows, once per open (the writer then asks for row blocks of the part)
            self.t = r.rows(spec.e, spec.e + 1, Scratch())[0, spec.lo:spec.hi].clone()
        finally:
            r.close()

    def rows(self, start: int, stop: int, scratch: Scratch) -> torch.Tensor:
        out = scratch.take(self.t.dtype, (stop - start, *self.t.shape[1:]))
        return out.copy_(self.t[start:stop])


class _Whole:
    """A fused tensor that cannot stream (a pickled or computed one): loaded once and kept until each of its
    `uses` slices has been taken, so splitting it costs one load, not one per expert."""

    def __init__(self, load, uses: int):
        self.load, self.uses, self.left, self.t = load, uses, 0, None
        self.lock = threading.Lock()

    def slice(self, e: int, lo: int, hi: int) -> torch.Tensor:
        with self.lock:
            if self.t is None:
                self.t, self.left = self.load(), self.uses
            out = self.t[e, lo:hi].clone()
            self.left -= 1
            if self.left <= 0:
                self.t = None
            return out


# ---- checks ---------------------------------------------------------------------------------------------------

def check_experts(refs: list[TensorRef], config: dict) -> None:
    """Bad input, before anything is read: an expert missing, an expert count that disagrees with config.json,
    a router (or shared-expert gate) of the wrong shape. Names are the hub layout's."""
    arch = archs.arch_of(config)
    moe = arch.moe
    if moe is None:
        return
    want = expert_count(config)
    text = _text(config)
    hidden = text.get("hidden_size")
    parts = {_rename(arch, p) for x in arch.experts for p in x.parts}
    blocks: dict[str, dict[str, dict[int, TensorRef]]] = {}
    for r in refs:
        m = EXPERT_RE.match(r.name)
        if m and m["part"] in parts:
            blocks.setdefault(m["block"], {}).setdefault(m["part"], {})[int(m["e"])] = r
            continue
        m = FUSED_RE.match(r.name)
        if m and any(x.param == m["param"] for x in arch.experts) and len(r.shape) == 3 and want is not None \
                and r.shape[0] != want:
            raise _count(r.name, r.shape[0], want, moe, r.origin)
    for block, by_part in blocks.items():
        found = set().union(*(set(d) for d in by_part.values()))
        n = max(found) + 1
        if want is not None and n > want:
            r = next(iter(by_part.values()))[max(found)]
            raise _count(f"{block}.experts", n, want, moe, r.origin)
        total = want if want is not None else n
        missing = sorted((e, p) for p in parts for e in range(total) if e not in by_part.get(p, {}))
        if missing:
            some = next(iter(next(iter(by_part.values())).values()))
            what = ", ".join(f"{block}.experts.{e}.{p}.weight" for e, p in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise RlexportError("moe-expert-missing", f"{len(missing)} expert tensor(s) missing: {what}{more}",
                                file=some.origin, hint=HINT)
    routers = {f"{b}.{moe.router}.weight" for b in blocks} | \
        {f"{m['block']}.{moe.router}.weight" for r in refs if (m := FUSED_RE.match(r.name))}
    for r in refs:
        if r.name in routers and want is not None and hidden is not None and tuple(r.shape) != (want, hidden):
            raise RlexportError("moe-router-shape", f"router '{r.name}' has shape {list(r.shape)}, not "
                                f"[{want} experts, {hidden} hidden] as config.json says", file=r.origin, hint=HINT)
        if any(r.name.endswith(f".{moe.router}.{b}") for b in moe.router_buffers) and want is not None \
                and tuple(r.shape) != (want,):
            raise RlexportError("moe-router-shape", f"router buffer '{r.name}' has shape {list(r.shape)}, not "
                                f"[{want}]", file=r.origin, hint=HINT)
        if moe.shared_gate and r.name.endswith(f".{moe.shared_gate}.weight") and hidden is not None \
                and tuple(r.shape) != (1, hidden):
            raise RlexportError("moe-router-shape", f"shared-expert gate '{r.name}' has shape {list(r.shape)}, "
                                f"not [1, {hidden}]", file=r.origin, hint=HINT)


def _count(name: str, n: int, want: int, moe: archs.Moe, origin: str) -> RlexportError:
    return RlexportError("moe-expert-count", f"{name} holds {n} experts but config.json says {moe.count_key} = "
                         f"{want}", file=origin, hint="pass the config.json (or --base) this checkpoint was "
                         "trained with")


# ---- facts for inspect ----------------------------------------------------------------------------------------

def layout(names, config: dict) -> str | None:
    """'fused' (transformers 5 in memory), 'per-expert' (hub checkpoints), 'none' (no expert tensors found) or
    None (not a MoE family rlexport knows)."""
    arch = archs.arch_of(config)
    if arch.moe is None:
        return None
    params = {x.param for x in arch.experts}
    kinds = set()
    for n in names:
        if (m := FUSED_RE.match(n)) and m["param"] in params:
            kinds.add("fused")
        elif EXPERT_RE.match(n):
            kinds.add("per-expert")
    return "+".join(sorted(kinds)) or "none"


def facts(names, config: dict) -> dict | None:
    """What `inspect` says of a MoE model: experts, top-k, shared experts, the layout found and the one written."""
    moe = moe_of(config)
    if moe is None:
        return None
    text = _text(config)
    shared = None
    if moe.shared:
        n_shared = text.get(moe.shared_count_key, 1) if moe.shared_count_key else 1
        shared = f"{n_shared} ({moe.shared}" + (f", gated by {moe.shared_gate}" if moe.shared_gate else "") + ")"
    return {"experts": expert_count(config), "top_k": text.get(moe.topk_key), "expert_size": text.get(moe.size_key),
            "shared_experts": shared, "layout_found": layout(names, config),
            "layout_written": "per-expert" if moe.per_expert else "fused"}


def never_quantized(config: dict) -> tuple[str, ...]:
    """Name suffixes of the MoE weights a quantized export keeps as trained and lists in `ignore`: the router
    and the shared-expert gate (llm-compressor's MoE recipes ignore `re:.*mlp.gate$` and
    `re:.*shared_expert_gate$`: a few rows deciding which experts run, cheap and sensitive). Experts are
    quantized one by one like any Linear."""
    arch = archs.arch_of(config)
    moe = arch.moe
    if moe is None:
        return ()
    block = _rename(arch, ".mlp.")
    return tuple(f"{block}{m}.weight" for m in (moe.router, moe.shared_gate) if m)


# ---- per expert -> fused (what transformers 5 builds in memory; verify's layer-by-layer models) ----------------

def to_memory_layout(refs: dict[str, TensorRef], config: dict) -> dict[str, TensorRef]:
    """The tensors under transformers 5's in-memory names: per-expert tensors stacked into the fused
    `<block>.experts.<param>` [E, parts' rows, in] (read when that module runs), Mixtral's block renamed back.
    Fused inputs and other families come back unchanged."""
    arch = archs.arch_of(config)
    if arch.moe is None:
        return dict(refs)
    out: dict[str, TensorRef] = {}
    groups: dict[tuple[str, str], dict[int, dict[str, TensorRef]]] = {}
    for name, r in refs.items():
        mem = name
        for in_memory, on_disk in arch.renames:
            mem = mem.replace(on_disk, in_memory)
        m = EXPERT_RE.match(mem)
        spec = next((x for x in arch.experts if m and m["part"] in x.parts), None)
        if spec is None:
            out[mem] = r if mem == name else r.renamed(mem)
            continue
        groups.setdefault((m["block"], spec.param), {}).setdefault(int(m["e"]), {})[m["part"]] = r
    for (block, param), experts in groups.items():
        spec = next(x for x in arch.experts if x.param == param)
        order = [[experts[e][p] for p in spec.parts] for e in sorted(experts)]
        first = order[0]
        shape = (len(order), sum(r.shape[0] for r in first), first[0].shape[1])
        out[f"{block}.experts.{param}"] = TensorRef(
            f"{block}.experts.{param}", first[0].dtype, shape,
            lambda order=order: torch.stack([torch.cat([r.load() for r in parts]) for parts in order]),
            first[0].origin)
    return out


def split_state(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """An in-memory state dict (transformers 5 names) under the hub checkpoint's names: fused experts as views of
    each expert's rows (verify compares a reference model's merged weights with an export by name)."""
    arch = archs.arch_of(config)
    if arch.moe is None or not arch.moe.per_expert:
        return state
    out = {}
    for name, t in state.items():
        hub = _rename(arch, name)
        m = FUSED_RE.match(hub)
        spec = next((x for x in arch.experts if m and x.param == m["param"]), None)
        if spec is None or t.dim() != 3:
            out[hub] = t
            continue
        rows = t.shape[1] // len(spec.parts)
        for e in range(t.shape[0]):
            for i, part in enumerate(spec.parts):
                out[f"{m['block']}.experts.{e}.{part}.weight"] = t[e, i * rows:(i + 1) * rows]
    return out

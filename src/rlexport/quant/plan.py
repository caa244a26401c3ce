"""Which tensors a quantized export quantizes, their row-block loaders, and the `quantization_config`.

Quantized: the 2-D `.weight` of every Linear inside the decoder layers (`*.layers.N.*`). Copied unchanged (and
the Linear ones listed in `ignore`, as llm-compressor writes them): `lm_head`, the embeddings, norms, biases and
a value model's `score` head (float32), a vision-language model's vision tower and projector. A Linear whose
input size is not a multiple of the group size (w4a16) is left unquantized and listed in `ignore` (llm-compressor
refuses it until the user ignores it).

Each quantized weight becomes two or three TensorRefs whose loads are StreamLoaders over the weight's own load
(the adapter merge in float32, the cast to the output dtype with its NaN/Inf check): every scheme here has one
scale per output row (channel) or per row and 128 columns (group), so a block of rows is quantized from that
block alone and memory stays flat. The scales a codes block computed are kept (a few bytes per row) for the
scale tensor; rows not yet computed are computed again.
"""
from __future__ import annotations

import math
import re
import threading

import torch

from .. import archs, moe
from ..errors import RlexportError
from ..stream import Rows, Scratch, StreamLoader, n_rows
from ..tensors import FLOATS, TensorRef
from .schemes import Scheme, codes, dtype_note, pack_int4, scales

LAYER = re.compile(r"(^|\.)layers\.\d+\.")
HEADS = ("score",)  # a value model's head (heads.HEAD_NAMES): float32, never quantized
CHUNK_BYTES = 4 << 20  # float32 bytes of the source rows per step when a block spans many source rows


def _row_chunk(in_features: int) -> int:
    return max(16, CHUNK_BYTES // max(1, in_features * 4))


class _Shared:
    """One quantized weight: its source load and the scales computed so far (for the scale tensor)."""

    def __init__(self, ref: TensorRef, scheme: Scheme):
        self.ref, self.scheme = ref, scheme
        out, inp = ref.shape
        self.groups = -(-inp // scheme.group_size) if scheme.group_size else 1
        self.scale = torch.empty((out, self.groups), dtype=ref.dtype)
        self.have = torch.zeros(out, dtype=torch.bool)
        self.lock = threading.Lock()

    def compute(self, w: torch.Tensor, start: int) -> torch.Tensor:
        s = scales(w, self.scheme)
        if not bool(torch.isfinite(s).all()):
            raise RlexportError("nonfinite-weights", f"tensor '{self.ref.name}' holds NaN or Inf: it cannot be "
                                "quantized", file=self.ref.origin,
                                hint="the training run diverged; export an earlier checkpoint")
        with self.lock:
            self.scale[start:start + len(w)] = s
            self.have[start:start + len(w)] = True
        return s


class QuantLoader(StreamLoader):
    """Rows of one of a quantized weight's tensors: `part` is "codes", "packed" or "scale"."""

    def __init__(self, shared: _Shared, part: str):
        self.shared, self.part = shared, part
        ref, scheme = shared.ref, shared.scheme
        out, inp = ref.shape
        if part == "scale":
            self.dtype, self.shape = ref.dtype, (out, shared.groups)
        elif part == "packed":
            self.dtype, self.shape = torch.int32, (out, inp * scheme.num_bits // 32)
        else:
            self.dtype, self.shape = scheme.stored, (out, inp)
        self.inner = ref.load
        self.streamable = isinstance(self.inner, StreamLoader) and self.inner.streamable

    def open(self) -> Rows:
        return _QuantRows(self)


class _QuantRows(Rows):
    def __init__(self, spec: QuantLoader):
        self.spec = spec
        self.inner = spec.inner.open() if spec.streamable else None
        self.whole: torch.Tensor | None = None
        self.local = threading.local()

    def _source(self, start: int, stop: int) -> torch.Tensor:
        if self.inner is not None:
            scratch = getattr(self.local, "scratch", None)
            if scratch is None:
                scratch = self.local.scratch = Scratch()
            scratch.reset()
            return self.inner.rows(start, stop, scratch)
        if self.whole is None:
            self.whole = self.spec.inner()  # not streamable (a mapped or pickled tensor): loaded once
        return self.whole[start:stop]

    def rows(self, start: int, stop: int, scratch: Scratch) -> torch.Tensor:
        spec, sh = self.spec, self.spec.shared
        out = scratch.take(spec.dtype, (stop - start, *spec.shape[1:]))
        if spec.part == "scale":
            with sh.lock:
                done = bool(sh.have[start:stop].all())
                if done:
                    out.copy_(sh.scale[start:stop])
            if done:
                return out
        step = _row_chunk(sh.ref.shape[1])
        for s in range(start, stop, step):
            e = min(stop, s + step)
            w = self._source(s, e)
            sc = sh.compute(w, s)
            if spec.part == "scale":
                out[s - start:e - start] = sc
                continue
            q = codes(w, sc, sh.scheme)
            out[s - start:e - start] = pack_int4(q) if spec.part == "packed" else q.to(spec.dtype)
        return out

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        self.whole = None


def _const(name: str, value: torch.Tensor, origin: str) -> TensorRef:
    return TensorRef(name, value.dtype, tuple(value.shape), lambda: value.clone(), origin)


def quantizable(ref: TensorRef, never: frozenset[str] = frozenset()) -> bool:
    """A decoder block's Linear weight; `never`: the embedding pair and heads, whatever their family calls them."""
    return (ref.name.endswith(".weight") and len(ref.shape) == 2 and ref.dtype in FLOATS
            and LAYER.search(ref.name) is not None and ref.name not in never)


def fits(ref: TensorRef, scheme: Scheme) -> bool:
    """Whether the scheme can quantize this Linear: w4a16 needs whole groups of 128 input columns (vLLM's WNA16
    kernels and compressed-tensors' group reshape)."""
    return not scheme.group_size or ref.shape[1] % scheme.group_size == 0


def quantize_refs(refs: list[TensorRef], scheme: Scheme, config: dict) -> tuple[list[TensorRef], dict, list[str]]:
    """The export's tensors with the decoder Linears quantized; the quantization_config; notes for the user.
    `config`: the model's config.json (its family's embedding and output layer names, archs.py)."""
    out: list[TensorRef] = []
    ignore: list[str] = []
    misfit: list[str] = []
    names = {r.name for r in refs}
    emb, out_layer = archs.embedding_pair(config)
    never = frozenset({emb, out_layer, *(f"{h}.weight" for h in HEADS)})
    for head in (out_layer, *(f"{h}.weight" for h in HEADS)):
        if head in names:
            ignore.append(head.removesuffix(".weight"))
    # a vision-language model's vision tower and projector stay as trained, as llm-compressor's VLM recipes leave
    # them; their Linears are listed in ignore, or vLLM would build quantized layers for them (archs.Vision.tower)
    vision = archs.vision_of(config)
    tower = vision.tower if vision else ()
    routers = moe.never_quantized(config)  # MoE routers and shared-expert gates stay as trained, listed in ignore
    for ref in refs:
        if routers and ref.name.endswith(routers) and len(ref.shape) == 2:
            ignore.append(ref.name[: -len(".weight")])
            out.append(ref)
            continue
        if tower and ref.name.startswith(tower):
            if ref.name.endswith(".weight") and len(ref.shape) == 2 and ref.dtype in FLOATS:
                ignore.append(ref.name[: -len(".weight")])
            out.append(ref)
            continue
        if not quantizable(ref, never):
            out.append(ref)
            continue
        module = ref.name[: -len(".weight")]
        if not fits(ref, scheme):
            misfit.append(f"{module} (input {ref.shape[1]} is not a multiple of {scheme.group_size})")
            ignore.append(module)
            out.append(ref)
            continue
        sh = _Shared(ref, scheme)
        if scheme.packed:
            out.append(TensorRef(f"{module}.weight_packed", torch.int32, QuantLoader(sh, "packed").shape,
                                 QuantLoader(sh, "packed"), ref.origin))
        else:
            out.append(TensorRef(ref.name, scheme.stored, ref.shape, QuantLoader(sh, "codes"), ref.origin))
        scale = QuantLoader(sh, "scale")
        out.append(TensorRef(f"{module}.weight_scale", ref.dtype, scale.shape, scale, ref.origin))
        if scheme.packed:
            out.append(_const(f"{module}.weight_shape", torch.tensor(list(ref.shape), dtype=torch.int64), ref.origin))
    group = {"targets": ["Linear"], "weights": scheme.weight_args(), "input_activations": scheme.activations,
             "output_activations": None, "format": scheme.format}
    config = {"quant_method": "compressed-tensors", "format": scheme.format, "config_groups": {"group_0": group},
              "ignore": ignore, "quantization_status": "compressed", "kv_cache_scheme": None,
              "sparsity_config": {}, "transform_config": {}, "global_compression_ratio": None}
    notes = [f"{m} left unquantized (listed in ignore)" for m in misfit]
    # the quantized Linears keep the export's dtype in their scales (and vLLM runs activations in it)
    dtypes = {r.dtype for r in out if r.name.endswith(".weight_scale")}
    notes += [n for n in (dtype_note(scheme, d) for d in sorted(dtypes, key=str)) if n]
    if tower:
        notes.append(f"the vision tower and its projector ({', '.join(tower)}) stay unquantized (listed in ignore)")
    if routers and any(i.endswith(tuple(r[: -len(".weight")] for r in routers)) for i in ignore):
        notes.append("the MoE routers (and shared-expert gates) stay unquantized (listed in ignore); experts are "
                     "quantized one by one")
    if "score" in ignore:
        notes.append("the value head `score` stays float32, not quantized (listed in ignore)")
    return out, config, notes

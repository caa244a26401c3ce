"""Merge: the output tensors of base + adapter, planned before any byte is read (see lora/apply.py)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

from .. import archs
from ..errors import RlexportError
from ..tensors import FLOATS, TensorRef
from . import deltas
from .config import mismatch, token_indices
from .deltas import fp32
from .read import Adapter, Update
from .streamed import Dora, LowRankMerge, Term, merge_whole

log = logging.getLogger("rlexport")
Op = Callable[[torch.Tensor], torch.Tensor]
# Update kinds planned outside this module (lora/others.py, lora/experts.py): kind -> fn(merge, update), passed in
# by apply.py so that those modules can use Merge without Merge importing them.
Planner = Callable[["Merge", Update], None]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class Merge:
    """The output tensors of base + adapter; build with Merge(refs, adapter).refs()."""

    def __init__(self, refs: list[TensorRef], adapter: Adapter, planners: dict[str, Planner] | None = None):
        self.adapter, self.config = adapter, adapter.config
        self.planners = dict(planners or {})
        self.base_config = adapter.base_config or {}
        self.arch = archs.arch_of(self.base_config)
        self.known = self.base_config.get("model_type") in archs.ARCHS
        self.tied = archs.is_tied(self.base_config)
        self.E, self.H = self.arch.embed, self.arch.head
        if self.tied:  # one shared parameter, stored as the embedding (head-only saves: LF RM dedupe)
            if not any(r.name == self.E for r in refs):
                refs = [r.renamed(self.E) if r.name == self.H else r for r in refs]
            refs = [r for r in refs if r.name != self.H]
        self.base = {r.name: r for r in refs}
        self.order = [r.name for r in refs]
        self.source: dict[str, TensorRef] = {}   # trained replacements of base tensors
        self.copies: dict[str, TensorRef] = {}   # tied only: a side with its own modules_to_save copy
        self.ops: dict[str, list[Op | Term | Dora]] = {}
        self.params_taken: set[tuple[str, str]] = set()  # (module, parameter) given to a target_parameters LoRA
        _check_base(self.base_config, adapter)
        self._check_tying()
        self._full()
        for u in adapter.updates:
            if u.kind in self.planners:
                self.planners[u.kind](self, u)
            else:
                getattr(self, f"_{u.kind}")(u)

    # -- names and shapes ---------------------------------------------------------------------------------------
    def resolve(self, name: str) -> str | None:
        if name in self.base or (self.tied and name == self.H):
            return name
        # vision-language models: the adapter's in-memory names against a base in the hub layout, or the reverse
        for other in (archs.to_hub(self.base_config, name), archs.to_memory(self.base_config, name)):
            if other in self.base or (self.tied and other == self.H):
                return other
        for frm, to in self.arch.renames:
            if name.replace(frm, to) in self.base:
                return name.replace(frm, to)
        return None

    def target(self, name: str) -> str:
        t = self.resolve(name)
        if t is None:
            raise mismatch(f"the adapter targets '{name}', which the base model does not have", self.adapter,
                           "adapter-base-mismatch")
        return t

    def stored(self, name: str) -> str:
        """The stored tensor a (side) name reads: the tied head reads the shared embedding."""
        return self.E if self.tied and name == self.H else name

    def shape(self, name: str) -> tuple[int, ...]:
        name = self.stored(name)
        return tuple(self.source.get(name, self.base[name]).shape)

    def add(self, name: str, op: Op | Term | Dora) -> None:
        self.ops.setdefault(name, []).append(op)

    def fan_in_fan_out(self, module: str, base: tuple[int, ...], out_in: tuple[int, int]) -> bool:
        # PEFT decides per layer type (Conv1D: True, Linear: False) whatever the config says.
        fifo = archs.is_conv1d(self.base_config, module) if self.known else bool(self.config.get("fan_in_fan_out"))
        if not self.known and out_in[0] != out_in[1] and base in (out_in, out_in[::-1]):
            fifo = base != out_in
        want = out_in[::-1] if fifo else out_in
        if base != want:
            raise mismatch(f"{module}.weight has shape {list(base)} in the base but the adapter's delta is "
                           f"{list(want)}", self.adapter)
        return fifo

    # -- trained full tensors -------------------------------------------------------------------------------------
    def _full(self) -> None:
        # PEFT loads the state dict in module order: a tied head's copy of the shared weight lands last
        for name, ref in sorted(self.adapter.full.items(), key=lambda kv: kv[0] == self.H):
            if self.tied and name in (self.E, self.H) and name in self.adapter.copies:
                self.copies[name] = ref
                continue
            t = self.stored(self.target(name))
            base = tuple(self.base[t].shape)
            if tuple(ref.shape) != base and not (t in (self.E, self.H) and tuple(ref.shape[1:]) == base[1:]):
                raise mismatch(f"the adapter's {name} has shape {list(ref.shape)}, the base's {list(base)}",
                               self.adapter)
            self.source[t] = ref

    # -- updates, one method per Update.kind ----------------------------------------------------------------------
    def _linear(self, u: Update) -> None:
        t = self.target(u.target)
        out, inn = u.b.shape[0], u.a.shape[1]
        fifo = self.fan_in_fan_out(u.module, self.shape(t), (out, inn))
        a, b, m, s = u.a, u.b, u.tensors.get("magnitude"), u.scaling
        if m is None:
            self.add(t, (a, b, s, fifo))
        elif tuple(m.shape) != (out,):
            raise mismatch(f"{u.module}: DoRA magnitude has shape {list(m.shape)}, expected [{out}]", self.adapter)
        elif not fifo:
            self.add(t, Dora((a, b, s, False), m))  # streamed by row blocks (lora/streamed.py)
        else:  # Conv1D weights [in, out]: the norm runs along the stored columns, merged whole
            self.add(t, lambda w: deltas.dora_linear(w, deltas.linear_delta(fp32(a), fp32(b), s, fifo), fp32(m),
                                                     fifo))
        if "bias" in u.tensors:
            self._lora_bias(u, out)

    def _lora_bias(self, u: Update, out: int) -> None:
        tb = self.resolve(f"{u.module}.bias")
        if tb is None:
            raise RlexportError("adapter-base-mismatch", f"{u.module}: lora_bias=True but the base layer has no bias "
                                "(PEFT cannot merge it either)", file=self.adapter.path,
                                hint="pass the --base the adapter was trained on")
        if self.shape(tb) != (out,):
            raise mismatch(f"{tb} has shape {list(self.shape(tb))}, the adapter's bias [{out}]", self.adapter)
        lb, s = u.tensors["bias"], u.scaling
        self.add(tb, lambda w: w.add_(fp32(lb) * s))

    def _embedding(self, u: Update) -> None:
        t = self.target(u.target)
        a, b, m, s = u.a, u.b, u.tensors.get("magnitude"), u.scaling
        want = (a.shape[1], b.shape[0])
        if self.shape(t) != want or (m is not None and tuple(m.shape) != (want[1],)):
            raise mismatch(f"{t} has shape {list(self.shape(t))} but the adapter's embedding delta is "
                           f"{list(want)}", self.adapter)
        if m is None:
            self.add(t, (a, b, s, True))  # (B @ A).T * s, the same as a transposed linear delta
        else:
            self.add(t, lambda w: deltas.dora_embedding(w, deltas.embedding_delta(fp32(a), fp32(b), s), fp32(m)))

    def _tokens(self, u: Update) -> None:
        t = self.target(u.target)
        idx = token_indices(self.config, u.module, self.E.rsplit(".", 1)[0])
        delta = u.tensors["delta"]
        rows, dim = self.shape(t)[0], self.shape(t)[-1]
        if idx is None or tuple(delta.shape) != (len(idx), dim) or any(not 0 <= i < rows for i in idx):
            raise RlexportError("adapter-config-invalid", f"{u.module}: trainable_token_indices "
                                f"{idx} do not fit the saved rows {list(delta.shape)} / {rows} tokens",
                                file=self.adapter.path / "adapter_config.json",
                                hint="use the adapter_config.json saved with these weights")
        index = torch.tensor(idx)
        op = lambda w: w.index_copy(0, index, delta.load().to(w))  # noqa: E731
        self.add(t, op)
        if self.tied and t == self.E:
            self.add(self.H, op)  # PEFT ties the token rows of the output embedding to the input's

    def _check_tying(self) -> None:
        touched = {u.target for u in self.adapter.updates} | set(self.adapter.full)
        if self.tied and self.config.get("ensure_weight_tying") and touched & {self.E, self.H}:
            raise RlexportError("unsupported-lora-variant", "ensure_weight_tying adapters on tied embeddings cannot "
                                "be merged by rlexport", file=self.adapter.path,
                                hint="merge it with PEFT (PeftModel.merge_and_unload) and export the merged folder")

    # -- output -----------------------------------------------------------------------------------------------------
    def build(self, name: str) -> TensorRef:
        stored = self.stored(name)
        src = self.source.get(stored, self.base[stored]).renamed(name)
        ops = self.ops.get(name)
        if not ops:
            return src
        if src.dtype not in FLOATS:
            raise RlexportError("quantized-base", f"{stored} is stored as {src.dtype}, not a float", file=src.origin,
                                hint="pass --base the full-precision model; adapters merge into float weights")
        if all(isinstance(op, (tuple, Dora)) for op in ops):
            # LoRA and DoRA: the writer may stream the base in row blocks through the deltas (bit-identical to PEFT)
            return dataclasses.replace(src, load=LowRankMerge(src.load, ops, src.shape), dtype=torch.float32)

        def merged(w: torch.Tensor) -> torch.Tensor:
            w = w.to(torch.float32, copy=True)
            for op in ops:
                w = merge_whole(w, op) if isinstance(op, (tuple, Dora)) else op(w)
            return w
        return src.mapped(merged, dtype=torch.float32)

    def refs(self) -> list[TensorRef]:
        out = []
        for name in self.order:
            if not (self.tied and name == self.E):
                out.append(self.build(name))
                continue
            out.append(self.copies.get(self.E) or self.build(self.E))
            if self.copies or self.ops.get(self.E) or self.ops.get(self.H):
                out.append(self.copies.get(self.H) or self.build(self.H))  # tie_embeddings re-ties equal sides
        self._check_vocab(out)
        return out

    def _check_vocab(self, out: list[TensorRef]) -> None:
        rows = {r.name: r.shape[0] for r in out if r.name in (self.E, self.H)}
        if len(set(rows.values())) > 1:
            raise RlexportError("vocab-mismatch", f"after the merge {self.E} has {rows.get(self.E)} rows but "
                                f"{self.H} has {rows.get(self.H)}", file=self.adapter.path,
                                hint="the adapter resized one of them only; save both (modules_to_save)")
        vocab = self.base_config.get("vocab_size")
        if rows and vocab and max(rows.values()) > vocab and \
                not any((self.adapter.path / f).is_file() for f in TOKENIZER_FILES):
            log.warning("the adapter grew the vocabulary to %d tokens but has no tokenizer beside it; the base's "
                        "tokenizer (%d) is exported", max(rows.values()), vocab)


def _check_base(config: dict, adapter: Adapter) -> None:
    q = config.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise RlexportError("quantized-base", f"the base model is quantized ({method}); adapters merge into "
                            "full-precision weights", file=adapter.path,
                            hint="pass --base the full-precision model (QLoRA adapters merge into it exactly)")

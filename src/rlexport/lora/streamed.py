"""Low-rank merges the writer can stream in row blocks (rlexport.stream protocol), in PEFT's operation order.

PEFT merges as `W += transpose(B @ A) * s`: the product, then the scale, then the add, each rounded in float32.
A fused `addmm(W, B, A, alpha=s)` rounds differently when s is not a power of two (rsLoRA, most alpha/r), which
would break "the 16-bit export is PEFT's float32 merge rounded once"; so the block is computed in the same order.
A row block of `B @ A` (or of its transpose, for Conv1D and embeddings) is the same dot products as the full
product, so blocks are bit-identical to the whole-tensor merge.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..stream import Rows, Scratch, StreamLoader
from ..tensors import TensorRef

Term = tuple[TensorRef, TensorRef, float, bool]  # lora_A [r, in], lora_B [out, r], scaling, transposed


def _block(a: torch.Tensor, b: torch.Tensor, s: float, transposed: bool, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of transpose(B @ A, transposed) * s."""
    return (b @ a[:, start:stop]).T * s if transposed else (b[start:stop] @ a) * s


class LowRankMerge(StreamLoader):
    """float32(base) + sum of low-rank deltas, one after the other (as PEFT merges them)."""

    def __init__(self, base: Callable[[], torch.Tensor], terms: list[Term], shape: tuple[int, ...]):
        self.base, self.terms = base, list(terms)
        self.dtype, self.shape = torch.float32, tuple(shape)
        self.streamable = isinstance(base, StreamLoader) and base.streamable

    def open(self) -> Rows:
        return _Rows(self)

    def __call__(self) -> torch.Tensor:
        if self.streamable:
            return super().__call__()
        w = self.base().to(torch.float32, copy=True)  # never add into a tensor the loader may share
        for a, b, s, t in self.terms:
            w.add_(_block(a.load().float(), b.load().float(), s, t, 0, w.shape[0]))
        return w


class _Rows(Rows):
    def __init__(self, spec: LowRankMerge):
        self.inner = spec.base.open()
        self.terms = [(a.load().float(), b.load().float(), s, t) for a, b, s, t in spec.terms]

    def rows(self, start: int, stop: int, scratch: Scratch) -> torch.Tensor:
        w = self.inner.rows(start, stop, scratch)
        if w.dtype != torch.float32:
            out = scratch.take(torch.float32, tuple(w.shape))
            w = out.copy_(w)
        for a, b, s, t in self.terms:
            w.add_(_block(a, b, s, t, start, stop))
        return w

    def close(self) -> None:
        self.inner.close()
        self.terms = []

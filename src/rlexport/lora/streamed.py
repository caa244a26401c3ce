"""Low-rank merges the writer can stream in row blocks (rlexport.stream protocol), bit-identical to PEFT.

PEFT merges as `W += transpose(B @ A) * s`: the whole product, then the scale, then the add, each rounded in
float32. Two shortcuts would change the last bit of some elements, and with it the rounding of a 16-bit export:
a fused `addmm(W, B, A, alpha=s)` (one rounding instead of two when s is not a power of two: rsLoRA, most
alpha/r), and products of very short row blocks (BLAS picks other kernels for them: 1- to 3-row blocks of
`B @ A` differ from the whole product in up to 70% of the elements). So the product is computed in row blocks of
at least MIN_ROWS rows, which equal the whole product's rows bit for bit (checked once per shape at run time,
transposed terms too; a whole delta where that fails), then scaled and added in PEFT's order, block by block.
DoRA on a Linear weight streams the same way: its norm is per output row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..stream import Rows, Scratch, StreamLoader
from ..tensors import TensorRef
from . import deltas

Term = tuple[TensorRef, TensorRef, float, bool]  # lora_A [r, in], lora_B [out, r], scaling, transposed


@dataclass(frozen=True)
class Dora:
    """A DoRA update of a Linear weight [out, in]: m / ||W + dW||_row * (W + dW) (peft DoraLinearVariant.merge).
    The norm is per output row, so it streams by row blocks like a plain delta."""
    term: Term  # never transposed (fan_in_fan_out DoRA normalizes columns: merged whole, lora/apply.py)
    magnitude: TensorRef  # [out]


def delta(term: Term) -> torch.Tensor:
    """transpose(B @ A, transposed) * s in float32 (peft lora.Linear / lora.Embedding get_delta_weight)."""
    a, b, s, transposed = term
    d = b.load().to(torch.float32) @ a.load().to(torch.float32)
    return (d.T if transposed else d) * s


class LowRankMerge(StreamLoader):
    """float32(base) + each delta in turn (as PEFT merges several adapters into one weight)."""

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
        for term in self.terms:
            w = merge_whole(w, term)
        return w


def merge_whole(w: torch.Tensor, term: Term | Dora) -> torch.Tensor:
    """A float32 weight (the caller's own) with one LoRA or DoRA term merged, the delta built whole."""
    if isinstance(term, Dora):
        return deltas.dora_linear(w, delta(term.term), term.magnitude.load().to(torch.float32), False)
    return w.add_(delta(term))


# Row blocks of B @ A, each at least MIN_ROWS long, are computed by the same BLAS kernel as the whole product and
# equal its rows bit for bit (MKL, OpenBLAS: every element is one K-ordered FMA chain; only very short products,
# 1-3 rows with MKL on AVX2, take a gemv-like path that sums in another order). That is checked once per process
# and (r, in) shape by `blocks_match_whole`; where it fails the delta is computed whole instead. Row blocks keep
# memory flat in model size: a whole float32 delta is the tensor's size (272 MB for a 7B MLP weight).
# A transposed delta ((B @ A).T: embeddings, Conv1D) has rows A.T[rows] @ B.T: the same products, summed by the
# kernel for the transposed problem; whether that equals the whole product bit for bit is checked the same way.
MIN_ROWS = 16
_MATCH: dict[tuple[int, int, bool], bool] = {}


def blocks_match_whole(r: int, n_in: int, transposed: bool = False) -> bool:
    key = (r, n_in, transposed)
    if key not in _MATCH:
        g = torch.Generator().manual_seed(0)
        m = 4 * MIN_ROWS + 5
        if transposed:  # PEFT: (B [n_in, r] @ A [r, m]).T; rows: A.T[rows] @ B.T
            b_t, a = torch.randn(n_in, r, generator=g), torch.randn(r, m, generator=g)
            whole, left, right = (b_t @ a).T, a.T.contiguous(), b_t.T.contiguous()
        else:
            left, right = torch.randn(m, r, generator=g), torch.randn(r, n_in, generator=g)
            whole = left @ right
        ok = True
        for step in (MIN_ROWS, MIN_ROWS + 3, 2 * MIN_ROWS + 1, m - MIN_ROWS):
            for lo in range(0, m, step):
                lo, hi = _span(lo, min(m, lo + step), m)
                ok = ok and torch.equal(left[lo:hi] @ right, whole[lo:hi])
        _MATCH[key] = ok
    return _MATCH[key]


_FUSED: dict[tuple[int, int, float], bool] = {}


def fused_matches(r: int, n_in: int, s: float) -> bool:
    """Whether W.addmm_(B, A, alpha=s) equals W + (B @ A) * s bit for bit (row blocks against the whole product).

    For s a power of two it should: the kernel's product is the same K-ordered FMA chain, scaling it by s is
    exact, and the one addition rounds once either way. The fused call saves the zeroing of a product buffer
    and a pass over it (~10% of an export's CPU). Checked once per process and shape, like blocks_match_whole."""
    key = (r, n_in, s)
    if key not in _FUSED:
        g = torch.Generator().manual_seed(1)
        m = 4 * MIN_ROWS + 5
        w = torch.randn(m, n_in, generator=g)
        b, a = torch.randn(m, r, generator=g) * 0.1, torch.randn(r, n_in, generator=g)
        ref = w + (b @ a) * s
        ok = True
        for step in (MIN_ROWS, 2 * MIN_ROWS + 1, m):
            for lo in range(0, m, step):
                lo, hi = _span(lo, min(m, lo + step), m)
                ok = ok and torch.equal(w[lo:hi].clone().addmm_(b[lo:hi], a, alpha=s), ref[lo:hi])
        _FUSED[key] = ok
    return _FUSED[key]


def _span(lo: int, hi: int, n: int) -> tuple[int, int]:
    """[lo, hi) widened to at least MIN_ROWS rows of the n (when the tensor has that many)."""
    if hi - lo >= MIN_ROWS:
        return lo, hi
    lo = max(0, min(lo, n - MIN_ROWS))
    return lo, min(n, max(hi, lo + MIN_ROWS))


class _Rows(Rows):
    def __init__(self, spec: LowRankMerge):
        self.inner = spec.base.open()
        self.n = spec.shape[0]
        self.terms: list = []  # (left [out, r], right [r, in] float32, s, s is a power of two, fused add) or a delta
        self.magnitudes: list = []  # per term: the DoRA magnitude [out] in float32, or None
        try:
            for t in spec.terms:
                m = t.magnitude.load().to(torch.float32) if isinstance(t, Dora) else None
                t = t.term if isinstance(t, Dora) else t
                a, b, s, transposed = t
                pow2 = s > 0 and math.frexp(s)[0] == 0.5
                if transposed and blocks_match_whole(a.shape[0], b.shape[0], True):
                    # rows of (B @ A).T are A.T[rows] @ B.T: the same product code path with the factors swapped
                    self.terms.append((a.load().to(torch.float32).T.contiguous(),
                                       b.load().to(torch.float32).T.contiguous(), s, pow2, False))
                elif not transposed and blocks_match_whole(a.shape[0], a.shape[1]):
                    fused = pow2 and m is None and fused_matches(a.shape[0], a.shape[1], s)
                    self.terms.append((b.load().to(torch.float32).contiguous(),
                                       a.load().to(torch.float32).contiguous(), s, pow2, fused))
                else:
                    self.terms.append(delta(t))
                self.magnitudes.append(m)
        except BaseException:
            self.inner.close()
            raise

    def rows(self, start: int, stop: int, scratch: Scratch) -> torch.Tensor:
        w = self.inner.rows(start, stop, scratch)
        if w.dtype != torch.float32:
            w = scratch.take(torch.float32, tuple(w.shape)).copy_(w)
        for t, m in zip(self.terms, self.magnitudes):
            if isinstance(t, torch.Tensor):
                w.add_(t[start:stop])
            else:
                self._add_product(w, t, start, stop, scratch)
            if m is not None:  # DoRA: w is now W + dW; scale each row to its magnitude (deltas.dora_linear)
                w.mul_((m[start:stop] / torch.linalg.norm(w, dim=1)).view(-1, 1))
        return w

    def _add_product(self, w: torch.Tensor, t: tuple, start: int, stop: int, scratch: Scratch) -> None:
        b, a, s, pow2, fused = t
        lo, hi = _span(start, stop, self.n)
        if fused and (lo, hi) == (start, stop):
            w.addmm_(b[lo:hi], a, alpha=s)  # = w + (B @ A)[rows] * s, bit for bit (see fused_matches)
            return
        d = scratch.take(torch.float32, (hi - lo, a.shape[1]))
        torch.mm(b[lo:hi], a, out=d)  # the rows of PEFT's B @ A, bit for bit (see MIN_ROWS)
        d = d[start - lo:stop - lo]
        if pow2:  # d * s is exact: one rounding either way, and one pass fewer
            w.add_(d, alpha=s)
        else:
            w.add_(d.mul_(s))

    def close(self) -> None:
        self.inner.close()
        self.terms, self.magnitudes = [], []

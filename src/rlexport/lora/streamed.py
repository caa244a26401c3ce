"""Low-rank merges the writer can stream in row blocks (rlexport.stream protocol), bit-identical to PEFT.

PEFT merges as `W += transpose(B @ A) * s`: the whole product, then the scale, then the add, each rounded in
float32. Two shortcuts would change the last bit of some elements, and with it the rounding of a 16-bit export:
a fused `addmm(W, B, A, alpha=s)` (one rounding instead of two when s is not a power of two: rsLoRA, most
alpha/r), and products of very short row blocks (BLAS picks other kernels for them: 1- to 3-row blocks of
`B @ A` differ from the whole product in up to 70% of the elements). So the product is computed in row blocks of
at least MIN_ROWS rows, which equal the whole product's rows bit for bit (checked once per shape at run time; a
whole delta where that fails, and for transposed terms), then scaled and added in PEFT's order, block by block.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..stream import Rows, Scratch, StreamLoader
from ..tensors import TensorRef

Term = tuple[TensorRef, TensorRef, float, bool]  # lora_A [r, in], lora_B [out, r], scaling, transposed


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
            w.add_(delta(term))
        return w


# Row blocks of B @ A, each at least MIN_ROWS long, are computed by the same BLAS kernel as the whole product and
# equal its rows bit for bit (MKL, OpenBLAS: every element is one K-ordered FMA chain; only very short products,
# 1-3 rows with MKL on AVX2, take a gemv-like path that sums in another order). That is checked once per process
# and (r, in) shape by `blocks_match_whole`; where it fails the delta is computed whole instead. Row blocks keep
# memory flat in model size: a whole float32 delta is the tensor's size (272 MB for a 7B MLP weight).
MIN_ROWS = 16
_MATCH: dict[tuple[int, int], bool] = {}


def blocks_match_whole(r: int, n_in: int) -> bool:
    key = (r, n_in)
    if key not in _MATCH:
        g = torch.Generator().manual_seed(0)
        m = 4 * MIN_ROWS + 5
        b, a = torch.randn(m, r, generator=g), torch.randn(r, n_in, generator=g)
        whole = b @ a
        ok = True
        for step in (MIN_ROWS, MIN_ROWS + 3, 2 * MIN_ROWS + 1, m - MIN_ROWS):
            for lo in range(0, m, step):
                lo, hi = _span(lo, min(m, lo + step), m)
                ok = ok and torch.equal(b[lo:hi] @ a, whole[lo:hi])
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
        self.terms: list = []  # (b [out, r], a [r, in] float32, s, s is a power of two, fused add) or a delta
        try:
            for t in spec.terms:
                a, b, s, transposed = t
                if not transposed and blocks_match_whole(a.shape[0], a.shape[1]):
                    pow2 = s > 0 and math.frexp(s)[0] == 0.5
                    fused = pow2 and fused_matches(a.shape[0], a.shape[1], s)
                    self.terms.append((b.load().to(torch.float32).contiguous(),
                                       a.load().to(torch.float32).contiguous(), s, pow2, fused))
                else:
                    self.terms.append(delta(t))
        except BaseException:
            self.inner.close()
            raise

    def rows(self, start: int, stop: int, scratch: Scratch) -> torch.Tensor:
        w = self.inner.rows(start, stop, scratch)
        if w.dtype != torch.float32:
            w = scratch.take(torch.float32, tuple(w.shape)).copy_(w)
        for t in self.terms:
            if isinstance(t, torch.Tensor):
                w.add_(t[start:stop])
                continue
            b, a, s, pow2, fused = t
            lo, hi = _span(start, stop, self.n)
            if fused and (lo, hi) == (start, stop):
                w.addmm_(b[lo:hi], a, alpha=s)  # = w + (B @ A)[rows] * s, bit for bit (see fused_matches)
                continue
            d = scratch.take(torch.float32, (hi - lo, a.shape[1]))
            torch.mm(b[lo:hi], a, out=d)  # the rows of PEFT's B @ A, bit for bit (see MIN_ROWS)
            d = d[start - lo:stop - lo]
            if pow2:  # d * s is exact: one rounding either way, and one pass fewer
                w.add_(d, alpha=s)
            else:
                w.add_(d.mul_(s))
        return w

    def close(self) -> None:
        self.inner.close()
        self.terms = []

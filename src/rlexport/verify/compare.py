"""Comparing the export's numbers and weights with the reference's: the verdicts of the numbers stage, with
dtype-dependent tolerances (numbers.py computes the numbers, whole models; streamed.py, layer by layer)."""
from __future__ import annotations

import math
import re

import torch

from ..tensors import FLOATS, TensorRef, dtype_name
from .numbers import N, SCORE_TOLERANCE, Numbers, tolerance
from .report import Check, failed, passed, skipped

RELATIVE = {torch.float32: 0.0, torch.bfloat16: 0.01, torch.float16: 0.002}  # logprobs: share of |log p| added
ULPS = {torch.float32: 64, torch.bfloat16: 1, torch.float16: 1}  # weights check: allowed distance in ulps
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _max_diff(a: list[list[float]], b: list[list[float]]) -> tuple[float, tuple[int, int]]:
    worst, where = 0.0, (0, 0)
    for i, (ra, rb) in enumerate(zip(a, b)):
        if len(ra) != len(rb):
            return math.inf, (i, 0)
        for j, (x, y) in enumerate(zip(ra, rb)):
            d = abs(x - y) if x is not None and y is not None else 0.0
            if not math.isfinite(d) or d > worst:
                worst, where = (math.inf if not math.isfinite(d) else d), (i, j)
    return worst, where


def compare_logprobs(ref: Numbers, got: Numbers, dtype, *, name="logprobs", stage=N, what="export") -> Check:
    """|Δ logprob| per token within `tolerance(dtype)` plus, for 16-bit exports, a share of |logprob|: rounding
    the weights once moves a logit in proportion to its size, so an unlikely token (log p = -12) of a deep
    bf16 model moves more than a likely one (measured: 0.07 on a 28-layer 7B geometry whose every tensor is the
    reference rounded to bf16 within 1 ulp)."""
    tol, rel = tolerance(dtype), RELATIVE.get(dtype, RELATIVE[torch.bfloat16])
    d, (i, j) = _max_diff(ref.logprobs, got.logprobs)
    worst, where = 0.0, (0, 0)
    for a, (ra, rb) in enumerate(zip(ref.logprobs, got.logprobs)):
        for b, (x, y) in enumerate(zip(ra, rb)):
            if x is not None and y is not None:
                over = abs(x - y) / (tol + rel * abs(x))
                if not math.isfinite(over) or over > worst:
                    worst, where = (math.inf if not math.isfinite(over) else over), (a, b)
    if not math.isfinite(d):
        worst, where = math.inf, (i, j)
    metrics = dict(max_diff=d, tolerance=tol, relative_tolerance=rel, dtype=dtype_name(dtype) if dtype else None)
    what_tol = f"{tol:g}" + (f" + {rel:g} x |logprob|" if rel else "")
    if worst > 1:
        i, j = where
        return failed(name, stage, f"prompt logprobs differ by up to {d:.4g} (tolerance {what_tol})",
                      [f"prompt {i}, token {j + 1}: reference {ref.logprobs[i][j]:.5f}, {what} "
                       f"{got.logprobs[i][j] if j < len(got.logprobs[i]) else float('nan'):.5f}"], **metrics)
    return passed(name, stage, f"max |Δ logprob| {d:.2g} <= {what_tol}", **metrics)


def compare_greedy(ref: Numbers, got: Numbers, dtype, *, name="greedy", stage=N, what="export") -> Check:
    tol = tolerance(dtype)
    near_ties, details = 0, []
    for i, (r, g) in enumerate(zip(ref.greedy, got.greedy)):
        for k, (a, b) in enumerate(zip(r, g)):
            if a == b:
                continue
            if ref.margins and ref.margins[i][k] < 2 * tol:
                near_ties += 1  # a near-tie in the reference: either token is right; the rest is not comparable
                break
            details.append(f"prompt {i}, step {k}: reference token {a}, {what} {b} (reference margin "
                           f"{ref.margins[i][k]:.3g})" if ref.margins else f"prompt {i}, step {k}: {a} vs {b}")
            break
    n = sum(len(r) for r in ref.greedy)
    if details:
        return failed(name, stage, f"greedy tokens diverge on {len(details)} of {len(ref.greedy)} prompts",
                      details, near_ties=near_ties, tokens=n)
    tie = f" ({near_ties} near-tie(s) skipped)" if near_ties else ""
    return passed(name, stage, f"{n} greedy tokens equal{tie}", near_ties=near_ties, tokens=n)


def compare_scores(ref: Numbers, got: Numbers, dtype, *, name="scores", stage=N, what="export",
                   last_only: bool = False) -> Check:
    r = [[s[-1]] for s in ref.scores] if last_only else ref.scores
    g = [[s[-1]] for s in got.scores] if last_only and got.scores and len(got.scores[0]) > 1 else got.scores
    scale = max([1.0] + [abs(x) for s in r for x in s])
    tol = tolerance(dtype, SCORE_TOLERANCE) * scale
    d, (i, j) = _max_diff(r, g)
    metrics = dict(max_diff=d, tolerance=tol, positions="last" if last_only else "all")
    if d > tol:
        return failed(name, stage, f"head scores differ by up to {d:.4g} (tolerance {tol:.3g})",
                      [f"prompt {i}, position {j}: reference {r[i][j]:.5f}, {what} "
                       f"{g[i][j] if j < len(g[i]) else float('nan'):.5f}"], **metrics)
    return passed(name, stage, f"max |Δ score| {d:.2g} <= {tol:.3g}", **metrics)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _, e = torch.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
    smallest = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return torch.clamp(torch.ldexp(torch.ones_like(x), e - 1 - MANTISSA[dtype]), min=smallest)


def _beyond(got: torch.Tensor, want: torch.Tensor) -> tuple[int, float]:
    """(elements farther than the allowed ulps from `want` rounded to got's dtype, max |Δ|)."""
    expect = want.to(got.dtype).float()
    diff = (got.float() - expect).abs()
    return int((diff > ULPS.get(got.dtype, 1) * _ulp(expect, got.dtype)).sum()), float(diff.max())


def _lookalike(name: str, got: torch.Tensor, ref_state: dict[str, torch.Tensor]) -> str | None:
    """The same tensor of another layer, when the exported one equals it (layers swapped or shifted)."""
    m = re.search(r"\.(\d+)\.", name)
    if m is None:
        return None
    for other, want in ref_state.items():
        if other != name and re.sub(r"\.\d+\.", ".#.", other, count=1) == re.sub(r"\.\d+\.", ".#.", name, count=1) \
                and tuple(want.shape) == tuple(got.shape) and _beyond(got, want)[0] == 0:
            return other
    return None


def compare_weights(ref_state: dict[str, torch.Tensor] | None, refs: dict[str, TensorRef],
                    dtype: torch.dtype | None) -> Check:
    """Every exported tensor against the reference's merged weights rounded once to the export dtype."""
    if ref_state is None:
        return skipped("weights", N, "no reference weights")
    bad, compared = [], 0
    for name, ref in refs.items():
        want = ref_state.get(name)
        if want is None or ref.dtype not in FLOATS:
            continue
        compared += 1
        got = ref.load()
        if tuple(got.shape) != tuple(want.shape):
            bad.append((name, got.numel(), math.inf, None))
            continue
        over, dmax = _beyond(got, want)
        if over:
            bad.append((name, over, dmax, _lookalike(name, got, ref_state)))
    return weights_verdict(bad, compared, dtype)


def weights_verdict(bad: list[tuple], compared: int, dtype: torch.dtype | None) -> Check:
    """bad: (name, elements beyond the allowed ulps, max |Δ|, the reference tensor it equals instead or None)."""
    metrics = dict(compared=compared, differing=len(bad), ulps=ULPS.get(dtype, 1))
    if bad:
        return failed("weights", N, f"{len(bad)} of {compared} tensors differ from the reference's merged weights",
                      [f"{n}: {k} elements beyond {ULPS.get(dtype, 1)} ulp (max |Δ| {m:.3g})" +
                       (f"; it is the reference's {like}" if like else "") for n, k, m, like in bad[:6]], **metrics)
    return passed("weights", N, f"{compared} tensors equal the reference rounded to {dtype_name(dtype)} "
                  f"(<= {ULPS.get(dtype, 1)} ulp)" if dtype else f"{compared} tensors equal", **metrics)

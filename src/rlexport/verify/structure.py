"""verify's structure stage, weights side: the header-only checks of rlexport.checks (files, architecture, tensor
names and shapes against the meta-device model, dtype), then the one check that reads tensor data, `values`
(tokens.py has the tokenizer side).

Each check is a function of the Folder (what earlier checks learned) and the training Source (or None without
--against); it returns one Check. Nothing here loads a model's weights: tensor bytes are streamed one tensor at a
time by the `values` check only.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..checks.facts import first_line as _first_line  # noqa: F401  (tokens.py, engine.py)
from ..checks.structure import (  # noqa: F401  (the checks live below export and verify; verify re-exports them)
    S, Folder, check_architecture, check_dtype, check_files, check_names, check_shapes, target_of, _config_dtype)
from ..formats import Source
from ..stream import row_blocks
from ..tensors import FLOATS
from .report import Check, failed, passed

TINY = 2.0 ** -17       # below this a bfloat16 value has mantissa bits finer than float16's subnormal step
FP16_STEP = 2.0 ** 24   # float16's subnormal step is 2**-24: x * FP16_STEP is an integer on its grid
MIN_TINY = 16           # tiny values needed before the float16-grid test means anything (2**-16 false alarms)


def check_values(f: Folder, source: Source | None) -> Check:
    nonfinite, peak, tiny, off_grid, n = [], 0.0, 0, 0, 0
    for name, ref in f.refs.items():
        if ref.dtype not in FLOATS or ref.numel == 0:
            continue
        n += 1
        for t in row_blocks(ref.load, ref.shape, ref.dtype.itemsize):  # bounded memory for embedding tables
            lo, hi = (float(x) for x in torch.aminmax(t))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                nonfinite.append(name)
                break
            peak = max(peak, abs(lo), abs(hi))
            if ref.dtype == torch.bfloat16:
                x = t.float()
                small = x[(x != 0) & (x.abs() < TINY)] * FP16_STEP
                tiny += small.numel()
                off_grid += int((small != small.round()).sum())
    empty = [n_ for n_, r in f.refs.items() if r.numel == 0 and r.dtype in FLOATS]
    metrics = dict(tensors=n, max_abs=peak, tiny_values=tiny, off_fp16_grid=off_grid)
    if empty:
        return failed("values", S, f"{len(empty)} empty [0]-shaped tensors (ZeRO-3 placeholders)", empty[:5],
                      **metrics)
    if nonfinite:
        return failed("values", S, f"{len(nonfinite)} tensors hold NaN or Inf", nonfinite[:5], **metrics)
    if tiny >= MIN_TINY and off_grid == 0:
        return failed("values", S, f"bfloat16 weights passed through float16: all {tiny} values below 2^-17 lie on "
                      "float16's subnormal grid", ["precision was lost in a float16 step (and values beyond 65504 "
                      "would be Inf); export straight from the float32/bfloat16 weights"], **metrics)
    if (f.config and _config_dtype(f.config) in ("float16", "fp16", "half")) and peak > 65504:
        return failed("values", S, f"|x| up to {peak:.4g} does not fit float16, which config.json asks for",
                      **metrics)
    return passed("values", S, f"{n} tensors finite, max |x| {peak:.3g}", **metrics)


CHECKS: tuple[Callable[[Folder, Source | None], Check], ...] = (
    check_files, check_architecture, check_names, check_shapes, check_dtype, check_values,
)

"""PEFT types beside LoRA whose merge is a closed formula: LoHa, LoKr (LyCORIS, `tuners/lycoris_utils.py ::
LycorisLayer.merge`: W += delta) and IA3 (`tuners/ia3/layer.py :: Linear.merge`: W *= l, bias *= l unless the
layer is feed-forward). Linear layers only; convolutional (CP) factors and Conv1D layers are refused.
"""
from __future__ import annotations

import torch

from .. import archs
from ..errors import RlexportError
from . import deltas
from .config import mismatch
from .deltas import fp32
from .merge import Merge
from .read import Update

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _no_conv1d(m: Merge, u: Update) -> None:
    if archs.is_conv1d(m.base_config, u.module):
        raise RlexportError("unsupported-lora-variant", f"{u.kind.upper()} on a Conv1D layer ({u.module}) "
                            "cannot be merged by rlexport", file=m.adapter.path, hint="merge it with PEFT")


def plan_loha(m: Merge, u: Update) -> None:
    t = m.target(u.target)
    _no_conv1d(m, u)
    w, s = u.tensors, u.scaling
    if set(w) != set(LOHA_PARTS) or (w["hada_w1_a"].shape[0], w["hada_w1_b"].shape[1]) != m.shape(t):
        raise mismatch(f"{u.module}: LoHa factors do not fit {t} {list(m.shape(t))}", m.adapter)
    m.add(t, lambda x: x.add_(deltas.loha_delta(*(fp32(w[k]) for k in LOHA_PARTS), s)))


def plan_lokr(m: Merge, u: Update) -> None:
    t = m.target(u.target)
    _no_conv1d(m, u)
    w, s, shape = u.tensors, u.scaling, m.shape(t)

    def factor(i: int):
        if f"lokr_w{i}" in w:
            full = w[f"lokr_w{i}"]
            return (lambda: fp32(full)), tuple(full.shape)
        a, b = w.get(f"lokr_w{i}_a"), w.get(f"lokr_w{i}_b")
        if a is None or b is None:
            raise RlexportError("adapter-incomplete", f"{u.module}: LoKr factor w{i} is missing", file=m.adapter.path,
                                hint="the adapter file is incomplete; copy it again from the training run")
        return (lambda: fp32(a) @ fp32(b)), (a.shape[0], b.shape[1])
    (f1, s1), (f2, s2) = factor(1), factor(2)
    if (s1[0] * s2[0], s1[1] * s2[1]) != shape:
        raise mismatch(f"{u.module}: LoKr factors {list(s1)} x {list(s2)} do not fit {list(shape)}", m.adapter)
    m.add(t, lambda x: x.add_(deltas.lokr_delta(f1(), f2(), s)))


def plan_ia3(m: Merge, u: Update) -> None:
    t = m.target(u.target)
    vec, shape = u.tensors["vec"], m.shape(t)
    fifo = archs.is_conv1d(m.base_config, u.module) if m.known else bool(m.config.get("fan_in_fan_out"))
    out, inn = shape[::-1] if fifo else shape
    feedforward = tuple(vec.shape) == (1, inn)
    if not feedforward and tuple(vec.shape) != (out, 1):
        raise mismatch(f"{u.module}: IA3 vector {list(vec.shape)} does not fit {t} {list(shape)}", m.adapter)
    m.add(t, lambda w: deltas.ia3_scale(w, fp32(vec), fifo))
    tb = m.resolve(f"{u.module}.bias")
    if not feedforward and tb is not None:
        m.add(tb, lambda b: torch.mul(b, fp32(vec).reshape(b.shape)))

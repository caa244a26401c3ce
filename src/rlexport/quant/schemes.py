"""The three data-free schemes and their formulas, exactly as compressed-tensors computes them.

Truth (compressed-tensors 0.19.0, what llm-compressor 0.14 `oneshot` runs; tests/fixtures/llmc_* are its output):
- quantization/utils/helpers.py `calculate_qparams`: min/max widened to include 0; symmetric
  `scales = max(|min|, |max|) / (bit_range.to(dtype) / 2)` in the weight's own dtype (bit_range = q_max - q_min:
  255 for int8 -> /127.5, 15 for int4 -> /7.5, 896 for fp8 e4m3 -> /448); a zero scale becomes the scale dtype's
  eps (`_get_dtype_eps`: torch.finfo(dtype).eps for bf16/fp16/fp32).
- llmcompressor/observers/min_max.py `_get_min_max`: plain amin/amax over the row (or 128-column group).
- quantization/lifecycle/initialize.py: the scale has the weight's dtype, shape [out, 1] (channel) or
  [out, ceil(in / group_size)] (group).
- quantization/lifecycle/forward_helpers.py `_quantize`: `x / scale`, plus the (zero) zero point in x's dtype,
  then quant_args.py `round_to_quantized_type_args`: clamp to [q_min, q_max], then torch.round (half to even) for
  int, `.to(float8_e4m3fn)` for fp8; then cast to the stored dtype.
- compressors/pack_quantized/helpers.py `pack_to_int32`: code + 8, eight 4-bit codes per int32, element i at bits
  4i (dense packing; identical to 0.17's padded packing for 4 bits), two's-complement int32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RlexportError

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


@dataclass(frozen=True)
class Scheme:
    name: str              # rlexport's name (--quantize)
    preset: str            # llm-compressor / compressed-tensors preset it reproduces
    format: str            # compressed-tensors format
    kind: str              # "int" | "float"
    num_bits: int
    group_size: int | None  # None: one scale per output channel
    stored: torch.dtype    # dtype of the stored codes (int32 for packed int4)
    activations: dict | None  # input_activations args (dynamic per-token), None for weight-only

    @property
    def q_range(self) -> tuple[float, float]:
        if self.kind == "int":
            half = 2.0 ** self.num_bits / 2
            return -half, half - 1
        return -FP8_MAX, FP8_MAX

    @property
    def packed(self) -> bool:
        return self.format == "pack-quantized"

    def weight_args(self) -> dict:
        return _args(num_bits=self.num_bits, type=self.kind, symmetric=True, dynamic=False,
                     strategy="group" if self.group_size else "channel", group_size=self.group_size,
                     observer="memoryless_minmax")


def _args(**kw) -> dict:
    base = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
            "observer": None, "observer_kwargs": {}, "scale_dtype": None, "strategy": None, "symmetric": True,
            "type": "int", "zp_dtype": None}
    base.update(kw)
    return base


SCHEMES: dict[str, Scheme] = {
    "int8": Scheme("int8", "W8A8", "int-quantized", "int", 8, None, torch.int8,
                   _args(num_bits=8, type="int", strategy="token", dynamic=True)),
    "fp8": Scheme("fp8", "FP8_DYNAMIC", "float-quantized", "float", 8, None, torch.float8_e4m3fn,
                  _args(num_bits=8, type="float", strategy="token", dynamic=True)),
    "w4a16": Scheme("w4a16", "W4A16", "pack-quantized", "int", 4, 128, torch.int32, None),
}


def dtype_note(scheme: Scheme, dtype: torch.dtype) -> str | None:
    """One line when the scheme and the export's dtype make a folder most vLLM builds cannot serve: the int8 W8A8
    kernels on GPUs and AMX CPUs quantize 16-bit activations only (measured on an AMX machine: `RuntimeError:
    int8_scaled_mm_with_quant: expect A to be bfloat16 or half`); vLLM serves the folder in its config's dtype."""
    if scheme.kind == "int" and scheme.activations is not None and dtype == torch.float32:
        return (f"--quantize {scheme.name} with --dtype float32 writes a folder most vLLM builds cannot serve: "
                "vLLM's int8 kernels on GPUs and AMX CPUs need 16-bit activations (int8_scaled_mm_with_quant: "
                "expect A to be bfloat16 or half); export with --dtype bfloat16")
    return None


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[str(name).lower()]
    except KeyError:
        raise RlexportError("bad-quantize", f"unknown --quantize scheme '{name}'",
                            hint=f"rlexport implements {', '.join(SCHEMES)} (int8 = W8A8, fp8 = FP8_DYNAMIC, "
                                 "w4a16 = int4 weights, group 128)") from None


def _grouped(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """[rows, in] -> [rows, groups, group] (group) or [rows, 1, in] (channel): the reduction is over the last dim."""
    if scheme.group_size:
        g = scheme.group_size
        return w.unflatten(-1, (-(-w.shape[-1] // g), g))
    return w.unsqueeze(1)


def scales(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Scales of a [rows, in] block in w's dtype: [rows, 1] (channel) or [rows, in / group_size] (group)."""
    x = _grouped(w, scheme)
    mn, mx = torch.aminmax(x, dim=-1)  # one pass over the weight (exact, as amin and amax)
    mn = torch.min(mn, torch.zeros_like(mn))
    mx = torch.max(mx, torch.zeros_like(mx))
    q_min, q_max = (torch.tensor(v) for v in scheme.q_range)
    bit_range = q_max - q_min
    absmax = torch.max(torch.abs(mn), torch.abs(mx))
    s = absmax / (bit_range.to(absmax.dtype) / 2)
    eps = torch.finfo(s.dtype).eps
    return torch.where(s == 0, torch.tensor(eps, dtype=s.dtype), s)


def codes(w: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Quantized codes of a [rows, in] block: int8 (int8 and int4 codes) or float8_e4m3fn, shape [rows, in]."""
    x = _grouped(w, scheme)
    s = scale.unsqueeze(-1)
    scaled = x / s  # in the weight's dtype, as compressed-tensors; the steps below work in place (one buffer)
    q_min, q_max = (torch.tensor(v) for v in scheme.q_range)
    if scheme.kind == "float":
        # the symmetric zero point, added as compressed-tensors does: it turns -0.0 into +0.0, which float8 keeps
        scaled += torch.zeros(s.shape, dtype=torch.int8).to(x.dtype)
        q = scaled.clamp_(q_min, q_max).to(torch.float8_e4m3fn).to(x.dtype).to(torch.float8_e4m3fn)
    else:
        # (no zero point added: -0.0 and +0.0 both round to the integer code 0)
        q = scaled.clamp_(q_min, q_max).round_().to(torch.int8)
    return q.flatten(start_dim=-2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[rows, in] int8 codes in [-8, 7] -> [rows, in / 8] int32, code i of each 8 at bits 4i (compressed-tensors)."""
    rows, cols = q.shape
    if cols % 8:
        raise AssertionError("int4 packing needs a multiple of 8 columns")
    v = (q.to(torch.int32) + 8).view(rows, cols // 8, 8)
    # the eight 4-bit fields do not overlap, so OR-ing them in int32 gives the two's-complement word directly (the
    # last field's shift into the sign bit wraps exactly as the int64 sum minus 2**32 would)
    packed = v[..., 0].clone()
    for i in range(1, 8):
        packed |= v[..., i] << (4 * i)
    return packed


def quantize(w: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
    """A whole weight -> its compressed-tensors tensors (suffixes weight / weight_packed, weight_scale, weight_shape)."""
    s = scales(w, scheme)
    q = codes(w, s, scheme)
    if scheme.packed:
        return {"weight_packed": pack_int4(q), "weight_scale": s,
                "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}
    return {"weight": q.to(scheme.stored), "weight_scale": s}

"""Lazy tensor references and the dtype/size vocabulary shared by every stage."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .errors import RlexportError

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
# safetensors header dtype names, both ways.
ST_NAMES = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
}
FROM_ST = {v: k for k, v in ST_NAMES.items()}
FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(text: str, *, what: str = "dtype") -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise RlexportError("bad-dtype", f"unknown {what} '{text}'",
                            hint="use one of auto, bfloat16, float16, float32") from None


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000; '500MiB' -> 524_288_000; plain ints are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise RlexportError("bad-size", f"cannot read size '{text}'", hint="write it like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "b").rstrip("b") or "b"
    base = 1024 if unit.endswith("i") else 1000
    power = "bkmgt".index(unit[0])
    return int(float(m.group(1)) * base ** power)


@dataclass(frozen=True)
class TensorRef:
    """A tensor known by name, dtype and shape; `load()` reads its bytes only when called."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    origin: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def renamed(self, name: str) -> "TensorRef":
        return replace(self, name=name)

    def mapped(self, fn: Callable[[torch.Tensor], torch.Tensor], *, dtype: torch.dtype | None = None,
               shape: tuple[int, ...] | None = None) -> "TensorRef":
        inner = self.load
        return replace(self, load=lambda: fn(inner()), dtype=dtype or self.dtype, shape=shape or self.shape)

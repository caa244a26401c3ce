"""PEFT adapters (LoRA and its variants, LoHa, LoKr, IA3): read the folder, merge into the base in float32.

read.py parses the adapter into updates, config.py holds PEFT's config semantics and refusals, deltas.py the
formulas, apply.py (with experts.py for MoE parameters) maps updates onto the base checkpoint's tensors.
"""
from __future__ import annotations

from .apply import apply_adapter
from .config import check_supported
from .read import Adapter, Update, read_adapter, strip_wrapper

LoraModule = Update  # the name older callers used

__all__ = ["Adapter", "LoraModule", "Update", "apply_adapter", "check_supported", "read_adapter", "strip_wrapper"]

"""diagnose(): the findings behind `rlexport inspect`. Each check is a small function in CHECKS.

A check takes the opened Source and the Facts gathered once (tensor value scan, tokenizer size) and returns
Findings. Reading tensor bytes is bounded: placeholders come from headers; NaN/Inf and float16 range need a
streamed scan, on by default up to SCAN_LIMIT_BYTES (`--scan` forces it, `--no-scan` skips it).
When the checkpoint cannot be opened for a reason the user can fix (no adapter_config.json, unresolved base,
unsupported PEFT type, ZeRO-3 placeholders in the adapter) inspect still answers, from the files alone.
"""
from __future__ import annotations

from .checks import CHECKS, diagnose
from .facts import SCAN_LIMIT_BYTES, Facts, architecture_known, gather
from .report import SCHEMA, inspect, summary

__all__ = ["CHECKS", "SCAN_LIMIT_BYTES", "SCHEMA", "Facts", "architecture_known", "diagnose", "gather", "inspect",
           "summary"]

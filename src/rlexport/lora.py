"""LoRA adapters: read the adapter folder, merge each delta into its base weight in float32.

PEFT's `LoraLayer.get_delta_weight` is the reference: delta = scaling * B @ A (transposed for
fan_in_fan_out), scaling = alpha / r, or alpha / sqrt(r) with rsLoRA; rank_pattern / alpha_pattern override
r and alpha per module. The delta is added in float32 and the result is cast once, by the caller.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RlexportError
from .tensors import TensorRef

SUPPORTED_PEFT_TYPES = ("LORA",)
WRAPPER_PREFIXES = ("base_model.model.",)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class LoraModule:
    module: str   # HF module path, e.g. model.layers.0.self_attn.q_proj
    a: TensorRef
    b: TensorRef
    scaling: float
    rank: int


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule]  # keyed by the target weight name ("<module>.weight")
    full: dict[str, TensorRef]      # modules_to_save copies, keyed by target weight name

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)


def strip_wrapper(name: str) -> str:
    for p in WRAPPER_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def _pattern_value(patterns: dict, module: str, default):
    # PEFT matches pattern keys against the end of the module path, first match wins.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def scaling_for(config: dict, module: str) -> tuple[int, float]:
    r = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r)))
    if r <= 0:
        raise RlexportError("adapter-config-invalid", f"rank {r} for {module}", hint="fix r in adapter_config.json")
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def check_supported(config: dict, file: Path) -> None:
    ptype = str(config.get("peft_type", "LORA")).upper()
    if ptype not in SUPPORTED_PEFT_TYPES:
        raise RlexportError("unsupported-peft-type", f"PEFT type {ptype} is not supported", file=file,
                            hint="merge it with PEFT (merge_and_unload) first, or retrain with LoRA")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias")):
        if config.get(flag):
            raise RlexportError("unsupported-lora-variant", f"{what} adapters are not supported yet", file=file,
                                hint="merge it with PEFT merge_and_unload for now")


def read_adapter(folder: Path, config: dict, refs: list[TensorRef]) -> Adapter:
    cfg_file = folder / "adapter_config.json"
    check_supported(config, cfg_file)
    parts: dict[str, dict[str, TensorRef]] = {}
    full: dict[str, TensorRef] = {}
    for ref in refs:
        name = strip_wrapper(ref.name)
        m = _LORA_KEY.match(name)
        if m:
            parts.setdefault(m["module"], {})[m["part"]] = ref
        elif name.endswith(".weight") or name.endswith(".bias"):
            full[name] = ref.renamed(name)  # modules_to_save / saved embedding layers: full replacements
        else:
            raise RlexportError("unsupported-adapter-tensor", f"adapter tensor '{ref.name}' is not understood",
                                file=ref.origin, hint="this adapter variant is not supported; merge it with PEFT")
    modules = {}
    for module, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise RlexportError("adapter-incomplete", f"module {module} lacks lora_A or lora_B",
                                file=folder / "adapter_model.safetensors", hint="the adapter file is incomplete")
        rank, scaling = scaling_for(config, module)
        a, b = ab["lora_A"], ab["lora_B"]
        if a.shape[0] != rank or b.shape[-1] != rank:
            raise RlexportError("adapter-rank-mismatch", f"{module}: tensors have rank {a.shape[0]} but "
                                f"adapter_config.json says r={rank}", file=cfg_file,
                                hint="use the adapter_config.json saved with these weights")
        modules[f"{module}.weight"] = LoraModule(module, a, b, scaling, rank)
    return Adapter(folder, config, modules, full)


def delta(mod: LoraModule, *, fan_in_fan_out: bool) -> torch.Tensor:
    d = mod.b.load().float() @ mod.a.load().float()
    return (d.T if fan_in_fan_out else d) * mod.scaling


def merge_ref(ref: TensorRef, mod: LoraModule, *, fan_in_fan_out: bool) -> TensorRef:
    """The base weight with the LoRA delta added, computed in float32 (the caller casts once)."""
    expected = (mod.b.shape[0], mod.a.shape[1])
    if fan_in_fan_out:
        expected = expected[::-1]
    if tuple(ref.shape) != expected:
        raise RlexportError("base-shape-mismatch", f"{ref.name} has shape {list(ref.shape)} in the base but the "
                            f"adapter's delta is {list(expected)}", file=ref.origin,
                            hint="pass the --base the adapter was trained on")

    def merged(w: torch.Tensor) -> torch.Tensor:
        out = w.to(torch.float32, copy=True) if w.dtype != torch.float32 else w.clone()
        return out.add_(delta(mod, fan_in_fan_out=fan_in_fan_out))

    return ref.mapped(merged, dtype=torch.float32)

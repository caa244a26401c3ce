"""adapter_config.json: which PEFT types and options rlexport merges, per-module rank/alpha, refusals.

Semantics follow PEFT (`tuners/lora/model.py :: _create_and_replace`, `utils/other.py :: get_pattern_key`,
`tuners/lora/layer.py :: LoraLayer.update_layer`). Anything rlexport cannot merge exactly is refused here,
before any tensor is read, with one line naming the type or option.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import RlexportError

# PEFT types merged by rlexport (the LoRA family plus the adapters whose merge is a closed formula).
MERGED_TYPES = ("LORA", "LOHA", "LOKR", "IA3")
MERGE_WITH_PEFT = "merge it with PEFT (PeftModel.merge_and_unload) and export the merged folder"

# LoraConfig options that change the math in ways rlexport does not reproduce: key -> what it is.
UNSUPPORTED_OPTIONS = {
    "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "aLoRA (activated LoRA)", "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA",
    "layer_replication": "layer_replication", "use_qalora": "QALoRA", "megatron_config": "Megatron LoRA",
}
# init_lora_weights values that rewrite the base weights at init: the adapter only fits the rewritten base, which
# is not saved. PEFT's conversion (path_initial_model_for_weight_conversion) resets the value to True, and such
# converted adapters merge with the ordinary formula. (gaussian, eva, orthogonal, mica only set A and B.)
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def peft_type(config: dict) -> str:
    return str(config.get("peft_type") or "LORA").upper()


def check_supported(config: dict, file: Path) -> None:
    """Refuse PEFT types and options whose merge rlexport does not reproduce exactly."""
    ptype = peft_type(config)
    if ptype not in MERGED_TYPES:
        raise RlexportError("unsupported-peft-type", f"PEFT type {ptype} cannot be merged by rlexport", file=file,
                            hint=MERGE_WITH_PEFT)
    for key, what in UNSUPPORTED_OPTIONS.items():
        if config.get(key) not in (None, False, {}, [], ""):
            raise RlexportError("unsupported-lora-variant", f"{what} adapters ({key}) cannot be merged by rlexport",
                                file=file, hint=MERGE_WITH_PEFT)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise RlexportError("unsupported-lora-init", f"init_lora_weights='{init}' adapters only fit the base that "
                            "PEFT rewrote at init, which is not saved", file=file,
                            hint="convert it with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) "
                                 "and export the converted adapter")
    if ptype == "LORA" and str(config.get("bias", "none")) not in ("none", "all", "lora_only"):
        raise RlexportError("adapter-config-invalid", f"unknown bias '{config.get('bias')}'", file=file,
                            hint="bias must be none, all or lora_only")


def pattern_value(patterns: dict | None, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: keys are regexes tried in order against a dot-bounded suffix
    of the module name (`model.layers.0.self_attn.q_proj`); the first that matches wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def rank_alpha(config: dict, name: str, file: Path | None = None) -> tuple[int, float]:
    """(r, alpha) for one module; name is the module path (or `module.param` for target_parameters)."""
    r = pattern_value(config.get("rank_pattern"), name, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not isinstance(alpha, (int, float)):
        raise RlexportError("adapter-config-invalid", f"rank {r!r} / alpha {alpha!r} for {name}", file=file,
                            hint="fix r, lora_alpha, rank_pattern or alpha_pattern in adapter_config.json")
    return r, alpha


def lora_scaling(config: dict, r: int, alpha) -> float:
    """PEFT LoraLayer.update_layer: alpha / r, or alpha / sqrt(r) with rsLoRA (a Python float, as in PEFT)."""
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def full_modules(config: dict) -> tuple[str, ...]:
    """modules_to_save entries: module names whose saved tensors are trained copies of the whole module."""
    mts = config.get("modules_to_save") or ()
    return tuple(mts) if isinstance(mts, (list, tuple)) else (str(mts),)


def token_indices(config: dict, module: str, embed_module: str) -> list[int] | None:
    """trainable_token_indices for one module: a list means the input embedding; a dict maps module names."""
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return [int(i) for i in spec] if module == embed_module else None
    if isinstance(spec, dict):
        for key, idx in spec.items():
            if module == key or module.endswith("." + key):
                return [int(i) for i in idx]
    return None


def mismatch(what: str, adapter, code: str = "base-shape-mismatch") -> RlexportError:
    """A base that does not fit the adapter: other shapes (base-shape-mismatch) or missing tensors."""
    return RlexportError(code, what, file=adapter.path, hint="pass the --base the adapter was trained on")

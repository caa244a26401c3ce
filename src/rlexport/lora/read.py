"""Read a PEFT adapter folder into updates: what each saved tensor does to which module, no bytes read.

Adapter-file names (peft `utils/save_and_load.py :: get_peft_model_state_dict`), after `base_model.model.`:
  M.lora_A.weight / M.lora_B.weight [/ M.lora_B.bias]      LoRA on a Linear or Conv1D (lora_bias)
  M.lora_magnitude_vector                                   DoRA magnitude
  M.lora_embedding_A / M.lora_embedding_B                   LoRA on an Embedding
  M[.base_layer]*.lora_A.weight  (target_parameters)        LoRA on a parameter (MoE experts), one per nesting
  M.token_adapter.trainable_tokens_delta                    trainable_token_indices: the new rows
  M.hada_w1_a ... / M.lokr_w1 ... / M.ia3_l                 LoHa / LoKr / IA3
  X.weight, X.bias, X.base_layer.weight, X.modules_to_save.weight   full tensors (modules_to_save copies,
                                                            saved embedding layers, bias="all")
An in-memory dump may carry the adapter name (`lora_A.default.weight`); one adapter name is accepted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import archs
from ..errors import RlexportError
from ..tensors import TensorRef
from .config import check_supported, full_modules, lora_scaling, peft_type, rank_alpha

WRAPPER_PREFIXES = ("base_model.model.",)
# (regex over the name without the wrapper prefix, update kind, tensor role)
_PARTS = (
    (r"lora_A(?:\.(?P<ad>[^.]+))?\.weight", "lora", "A"),
    (r"lora_B(?:\.(?P<ad>[^.]+))?\.weight", "lora", "B"),
    (r"lora_B(?:\.(?P<ad>[^.]+))?\.bias", "lora", "bias"),
    (r"lora_magnitude_vector(?:\.(?P<ad>[^.]+))?(?:\.weight)?", "lora", "magnitude"),
    (r"lora_embedding_A(?:\.(?P<ad>[^.]+))?", "embedding", "A"),
    (r"lora_embedding_B(?:\.(?P<ad>[^.]+))?", "embedding", "B"),
    (r"token_adapter\.trainable_tokens_delta(?:\.(?P<ad>[^.]+))?", "tokens", "delta"),
    (r"(?P<role>hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b|hada_t1|hada_t2)(?:\.(?P<ad>[^.]+))?", "loha", None),
    (r"(?P<role>lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|lokr_t2)(?:\.(?P<ad>[^.]+))?", "lokr", None),
    (r"ia3_l(?:\.(?P<ad>[^.]+))?", "ia3", "vec"),
)
_PART_RES = tuple((re.compile(rf"^(?P<module>.+?)\.{rx}$"), kind, role) for rx, kind, role in _PARTS)
LORA_KINDS = ("linear", "embedding", "param")


@dataclass(frozen=True)
class Update:
    """One adapted module (or targeted parameter) and the saved tensors that change it."""

    module: str                     # module path as PEFT saw it in memory, e.g. model.layers.0.self_attn.q_proj
    kind: str                       # linear | embedding | param | tokens | loha | lokr | ia3
    tensors: dict[str, TensorRef]   # by role: A, B, bias, magnitude / delta / hada_w1_a ... / vec
    scaling: float = 1.0
    rank: int = 0
    depth: int = 0                  # param: ParamWrappers nested inside this one (`.base_layer` in the name)

    @property
    def a(self) -> TensorRef | None:
        return self.tensors.get("A")

    @property
    def b(self) -> TensorRef | None:
        return self.tensors.get("B")

    @property
    def target(self) -> str:
        return f"{self.module}.weight"


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict
    updates: tuple[Update, ...]
    full: dict[str, TensorRef]            # trained full tensors, by in-memory tensor name
    copies: frozenset[str] = frozenset()  # names in `full` that are modules_to_save copies (the rest replace base)
    base_config: dict | None = field(default=None, compare=False)

    @property
    def modules(self) -> dict[str, Update]:
        """The LoRA updates of whole weights, keyed by the checkpoint weight they change (the shared embedding
        for a tied lm_head; archs.py renames applied). Expert-parameter LoRAs change many tensors and are left
        out; `apply_adapter` checks everything exactly."""
        cfg = self.base_config or {}
        arch = archs.arch_of(cfg)
        tied = archs.is_tied(cfg)
        out = {}
        for u in self.updates:
            if u.kind not in ("linear", "embedding"):
                continue
            name = archs.to_hub(cfg, u.target)
            name = arch.embed if tied and name == arch.head else name
            for frm, to in arch.renames:
                name = name.replace(frm, to)
            out[name] = u
        return out

    @property
    def rank(self) -> int:
        return max((u.rank for u in self.updates), default=0)

    @property
    def peft_type(self) -> str:
        return peft_type(self.config)

    def peft_config(self):
        """PEFT's config for this adapter, for the reference models verify builds: adapter_config.json as saved,
        else (a trainer that saved the PeftModel whole, verl) a LoraConfig from the settings it recorded."""
        from peft import LoraConfig, PeftConfig
        if (self.path / "adapter_config.json").is_file():
            return PeftConfig.from_pretrained(self.path)
        return LoraConfig(**{k: v for k, v in self.config.items() if k in SAVED_WHOLE_KEYS})

    def bind(self, base_config: dict) -> "Adapter":
        """The same adapter, knowing the base model's config (architecture, tied embeddings)."""
        return Adapter(self.path, self.config, self.updates, self.full, self.copies, base_config)


# the LoraConfig settings a trainer that saves the adapter whole records (verl's lora_train_meta.json + defaults)
SAVED_WHOLE_KEYS = ("r", "lora_alpha", "target_modules", "target_parameters", "bias", "fan_in_fan_out", "use_rslora",
                    "task_type", "rank_pattern", "alpha_pattern")


def strip_wrapper(name: str) -> str:
    for p in WRAPPER_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def _full_name(name: str) -> str | None:
    """Plain module-tensor name of a full tensor, None for PEFT's untouched original copies."""
    if ".original_module." in name:
        return None
    name = re.sub(r"\.modules_to_save(\.[^.]+)?\.(?=[^.]+$)", ".", name)  # X.modules_to_save[.default].weight
    return name.replace(".base_layer.", ".")


def _classify(refs: list[TensorRef], file: Path):
    parts: dict[tuple[str, str], dict[str, TensorRef]] = {}
    full: dict[str, TensorRef] = {}
    names: set[str] = set()
    for ref in refs:
        name = strip_wrapper(ref.name)
        for rx, kind, role in _PART_RES:
            m = rx.match(name)
            if m:
                if m["ad"] and m["ad"] != "weight":  # older DoRA saves: lora_magnitude_vector.weight
                    names.add(m["ad"])
                key = (m["module"], "lora" if kind == "embedding" else kind)
                parts.setdefault(key, {})[("emb_" if kind == "embedding" else "") + (role or m["role"])] = ref
                break
        else:
            plain = _full_name(name)
            if plain is None:
                continue
            if "." not in plain:
                raise RlexportError("unsupported-adapter-tensor", f"adapter tensor '{ref.name}' is not understood",
                                    file=file, hint="this adapter variant is not supported; merge it with PEFT")
            if plain in full and tuple(full[plain].shape) != tuple(ref.shape):
                raise RlexportError("adapter-inconsistent", f"two saved copies of {plain} differ in shape",
                                    file=file, hint="the adapter file is damaged; save it again")
            if plain not in full or ".modules_to_save." in name:
                full[plain] = ref.renamed(plain)
    if len(names) > 1:
        raise RlexportError("several-adapters-in-file", f"the file holds adapters {', '.join(sorted(names))}",
                            file=file, hint="save each adapter on its own with PeftModel.save_pretrained")
    return parts, full


def _lora_update(module: str, t: dict[str, TensorRef], config: dict, file: Path, cfg_file: Path) -> Update:
    kind = "embedding" if "emb_A" in t or "emb_B" in t else "lora"
    t = {k.removeprefix("emb_"): v for k, v in t.items()}
    if set(t) - {"A", "B", "bias", "magnitude"} or not {"A", "B"} <= set(t):
        raise RlexportError("adapter-incomplete", f"module {module} lacks lora_A or lora_B", file=file,
                            hint="the adapter file is incomplete; copy it again from the training run")
    depth = 0
    while module.endswith(".base_layer"):
        module, depth = module[: -len(".base_layer")], depth + 1
    if config.get("target_parameters") and _targets_param(config, module):
        if "bias" in t or "magnitude" in t:
            raise RlexportError("adapter-config-invalid", f"{module}: lora_bias/DoRA on target_parameters",
                                file=file, hint="PEFT does not allow these together; check the adapter")
        return Update(module, "param", t, depth=depth)  # rank and scaling depend on the parameter (apply time)
    if depth:
        raise RlexportError("unsupported-adapter-tensor", f"nested adapter layer under {module}", file=file,
                            hint="this adapter variant is not supported; merge it with PEFT")
    r, alpha = rank_alpha(config, module, cfg_file)
    if len(t["A"].shape) != 2 or len(t["B"].shape) != 2 or t["A"].shape[0] != r or t["B"].shape[1] != r:
        raise RlexportError("adapter-rank-mismatch", f"{module}: tensors have rank {t['A'].shape[0]} but "
                            f"adapter_config.json says r={r}", file=cfg_file,
                            hint="use the adapter_config.json saved with these weights")
    return Update(module, "embedding" if kind == "embedding" else "linear", t, lora_scaling(config, r, alpha), r)


def _targets_param(config: dict, module: str) -> bool:
    return any(t.rpartition(".")[0] == module or module.endswith("." + t.rpartition(".")[0])
               for t in config.get("target_parameters") or ())


def read_adapter(folder: Path, config: dict, refs: list[TensorRef]) -> Adapter:
    """Describe the adapter: its updates and full tensors, checked against adapter_config.json."""
    cfg_file = folder / "adapter_config.json"
    check_supported(config, cfg_file)
    file = Path(refs[0].origin) if refs else folder
    parts, full = _classify(refs, file)
    ptype = peft_type(config)
    updates = []
    for (module, kind), t in parts.items():
        expected = {"lora": "LORA", "tokens": "LORA", "loha": "LOHA", "lokr": "LOKR", "ia3": "IA3"}[kind]
        if expected != ptype and kind != "tokens":
            raise RlexportError("adapter-inconsistent", f"{module} has {kind} tensors but adapter_config.json says "
                                f"peft_type {ptype}", file=cfg_file, hint="use the config saved with these weights")
        if kind == "lora":
            updates.append(_lora_update(module, t, config, file, cfg_file))
        elif kind in ("loha", "lokr"):
            if {"hada_t1", "hada_t2", "lokr_t2"} & set(t):
                raise RlexportError("unsupported-lora-variant", f"{module}: convolutional (CP) {kind.upper()} "
                                    "factors cannot be merged by rlexport", file=file, hint="merge it with PEFT")
            r, alpha = rank_alpha({**config, "lora_alpha": config.get("alpha", 8)}, module, cfg_file)
            updates.append(Update(module, kind, t, alpha / r, r))
        else:  # tokens, ia3: no rank
            updates.append(Update(module, kind, t))
    if not updates and not full:
        raise RlexportError("empty-adapter", "the adapter file holds no tensors", file=file,
                            hint="the save failed (ZeRO-3 without gathering?); save the adapter again")
    copies = frozenset(n for n in full if _is_copy(config, n))
    return Adapter(folder, config, tuple(updates), full, copies)


def _is_copy(config: dict, name: str) -> bool:
    module = name.rsplit(".", 1)[0]
    return any(module == m or module.endswith("." + m) for m in full_modules(config))

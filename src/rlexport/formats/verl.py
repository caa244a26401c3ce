"""verl FSDP / FSDP2 checkpoints (`FSDPCheckpointManager.save_checkpoint`), read without verl.

Layout (verl 0.9.1): `<run>/latest_checkpointed_iteration.txt` ("N") + `<run>/global_step_N/{actor,critic}/`
holding `model_world_size_W_rank_R.pt` (one per rank: `{name: DTensor}`, see dtensor.py), `optim_*` and
`extra_state_*` (never read), `fsdp_config.json` (`FSDP_version`, `world_size`), `huggingface/` (config.json,
tokenizer, generation_config for the actor) and, for LoRA runs, `lora_train_meta.json` (`r`, `lora_alpha`,
`task_type`). The folder passed may be the run folder, a `global_step_N/` (actor/ is read, critic/ when it is
the only one) or the actor/ / critic/ folder itself; `--tag global_step_N` picks a step.

- The critic is `AutoModelForTokenClassification` (`score.weight` + `score.bias`, no `lm_head`) saved with the
  base's config.json (architectures `...ForCausalLM`): it is told by its tensors and exported as a value model.
- A LoRA actor is saved whole under PEFT names (`base_model.model.` ... `.base_layer.weight`,
  `lora_A.default.weight`): the base tensors become the weights, the LoRA factors an adapter (alpha / r from
  lora_train_meta.json; verl 0.9.1 has no rsLoRA setting and records none) merged in float32 on export.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import RlexportError
from . import Piece, Source
from .common import has_tokenizer, model_weights, resolve_base
from .files import read_json

ITER_FILE = "latest_checkpointed_iteration.txt"
RANK_RE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
STEP_RE = re.compile(r"^global_step_(\d+)$")
ROLES = ("actor", "critic")
LORA_RE = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)(\.|$)")
PEFT_PREFIX = "base_model.model."


def is_role_dir(path: Path) -> bool:
    try:
        return path.is_dir() and ((path / "fsdp_config.json").is_file() or
                                  any(RANK_RE.match(p.name) for p in path.iterdir()))
    except OSError:
        return False


def is_step_dir(path: Path) -> bool:
    return any(is_role_dir(path / r) for r in ROLES)


def _steps(path: Path) -> list[Path]:
    try:
        found = [p for p in path.iterdir() if STEP_RE.match(p.name) and is_step_dir(p)]
    except OSError:
        return []
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def detect(path: Path) -> bool:
    return is_role_dir(path) or is_step_dir(path) or bool(_steps(path))


def _split(path: Path) -> tuple[Path, str | None]:
    """(run folder, role or None) for a run, step or role folder."""
    if is_role_dir(path) and path.name in ROLES and is_step_dir(path.parent):
        return path.parent.parent, path.name
    if is_step_dir(path) and STEP_RE.match(path.name):
        return path.parent, None
    return path, None


def select(path: Path, *, tag: str | None = None, adapter: str | None = None) -> Path | None:
    """The registry's hook: the step `--tag` names in a verl run (None: no tag, or not a verl folder)."""
    return step_dir(Path(path), tag) if tag is not None and detect(Path(path)) else None


def step_dir(path: str | Path, tag: str) -> Path:
    """The step folder (or its actor/ / critic/, if that was passed) for `--tag global_step_N` (or N)."""
    path = Path(path)
    name = f"global_step_{tag}" if tag.isdigit() else tag
    run, role = _split(path)
    found = run / name
    if not STEP_RE.match(name) or not is_step_dir(found):
        have = ", ".join(p.name for p in _steps(run)) or "none"
        raise RlexportError("tag-not-found", f"no verl checkpoint '{tag}' here (steps: {have})", file=run,
                            hint="pass one of the global_step_N/ folders listed with --tag")
    return found / role if role else found


def locate(path: Path) -> Path:
    """The actor/ or critic/ folder to read."""
    if is_role_dir(path):
        return path
    if is_step_dir(path):
        return next(path / r for r in ROLES if is_role_dir(path / r))
    it = path / ITER_FILE
    if it.is_file():
        n = it.read_text(errors="replace").strip()
        step = path / f"global_step_{n}"
        if not n.isdigit() or not is_step_dir(step):
            raise RlexportError("tag-not-found", f"{ITER_FILE} names step {n!r} but global_step_{n}/ holds no verl "
                                "checkpoint", file=it, hint="copy that step's folder, or pick another with --tag")
        return locate(step)
    steps = _steps(path)
    if len(steps) == 1:
        return locate(steps[0])
    raise RlexportError("several-tags", f"{len(steps)} verl checkpoints and no {ITER_FILE} "
                        f"({', '.join(s.name for s in steps)})", file=path, hint="pick one with --tag")


def rank_files(role_dir: Path) -> list[Path]:
    """model_world_size_W_rank_R.pt for R in 0..W-1, checked against each other and fsdp_config.json."""
    found = {}
    for p in role_dir.iterdir():
        m = RANK_RE.match(p.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = p
    if not found:
        raise RlexportError("missing-weights", "no model_world_size_W_rank_R.pt rank files (the step was saved "
                            "without 'model' in checkpoint.save_contents?)", file=role_dir,
                            hint="pass a step saved with the model weights")
    sizes = sorted({w for w, _ in found})
    cfg_file = role_dir / "fsdp_config.json"
    declared = read_json(cfg_file).get("world_size") if cfg_file.is_file() else None
    if len(sizes) > 1 or (declared is not None and declared != sizes[0]):
        said = f"; fsdp_config.json says world_size {declared}" if declared is not None else ""
        raise RlexportError("verl-world-size-mismatch", f"rank files of world size {', '.join(map(str, sizes))}"
                            f"{said}", file=cfg_file if declared is not None else role_dir,
                            hint="keep only the rank files of one save, all of them, with its fsdp_config.json")
    w = sizes[0]
    missing = [r for r in range(w) if (w, r) not in found]
    if missing:
        names = ", ".join(f"model_world_size_{w}_rank_{r}.pt" for r in missing[:3])
        raise RlexportError("verl-missing-rank", f"{len(missing)} of {w} rank files missing ({names})",
                            file=role_dir, hint="copy every rank's model_world_size_*.pt file of this step")
    return [found[(w, r)] for r in range(w)]


def _strip(name: str) -> str:
    # ParamWrappers nest: a MoE's experts.base_layer.base_layer.gate_up_proj is experts.gate_up_proj
    return re.sub(r"(?:\.base_layer)+\.", ".", name.removeprefix(PEFT_PREFIX))


def _lora(role_dir: Path, refs, config: dict):
    """(base weights, adapter) of a PEFT model saved whole (or only its LoRA factors, save_lora_only)."""
    from ..lora import read_adapter
    from ..lora.experts import saved_whole_params
    meta_file = role_dir / "lora_train_meta.json"
    if not meta_file.is_file():
        raise RlexportError("adapter-without-config", "the rank files hold a PEFT model (lora_A/lora_B tensors) "
                            "but no lora_train_meta.json gives its rank and alpha", file=role_dir,
                            hint="copy lora_train_meta.json of the step from the training run")
    meta = read_json(meta_file)
    peft = [r.renamed(r.name.replace(".default.", ".", 1) if r.name.endswith(".default.weight") else r.name)
            for r in refs if LORA_RE.search(r.name) or ".modules_to_save." in r.name or ".original_module." in r.name]
    peft_names = {r.name for r in refs if LORA_RE.search(r.name) or ".modules_to_save." in r.name
                  or ".original_module." in r.name}
    base = [r.renamed(_strip(r.name)) for r in refs if r.name not in peft_names]
    targets = sorted({_target(m.group(1)) for r in peft
                      if (m := re.match(r"^(.+)\.lora_(?:embedding_)?A(?:\.weight)?$", _strip(r.name)))})
    cfg = {"peft_type": "LORA", "r": meta.get("r"), "lora_alpha": meta.get("lora_alpha"),
           "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "task_type": meta.get("task_type", "CAUSAL_LM")}
    # LoRA on parameters (MoE experts): target_parameters and the ranks PEFT gave them, from the tensors
    kept = [r for r in refs if r.name not in peft_names] + peft
    params = saved_whole_params([r.renamed(r.name.removeprefix(PEFT_PREFIX)) for r in kept], config,
                                meta.get("r"), meta.get("lora_alpha"), role_dir / "lora_train_meta.json")
    if params["target_parameters"]:
        wrapped = {m.rsplit(".", 1)[-1] for m in params.pop("param_modules")}
        cfg.update(params, target_modules=[t for t in targets if t not in wrapped and t != "base_layer"])
    return base, read_adapter(role_dir, cfg, peft).bind(config)


def _target(module: str) -> str:
    """A LoRA'd module as a PEFT target_modules suffix: its last name, with its parent where that is an index (a
    vision merger's `mlp.0`: a bare `0` would also match every `blocks.0` when verify rebuilds the PeftModel)."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def read(path: Path, *, base=None) -> Source:
    from .dtensor import sharded_refs
    from .value_heads import causal_config, detect_head
    role_dir = locate(path)
    files = rank_files(role_dir)
    hf = role_dir / "huggingface"
    base_dir = resolve_base(base, relative_to=role_dir, explicit=True) if base is not None else None
    if (hf / "config.json").is_file():
        config, config_dir = read_json(hf / "config.json"), hf
    elif base_dir is not None:
        config, config_dir = read_json(base_dir / "config.json"), base_dir
    else:
        raise RlexportError("missing-config", "the verl checkpoint has no huggingface/config.json", file=role_dir,
                            hint="pass --base with the model the run started from (its config.json and tokenizer "
                                 "are used)")
    refs = sharded_refs(files)
    adapter, head, info, stage, head_file = None, (), None, None, None
    if any(LORA_RE.search(r.name) for r in refs):
        refs, adapter = _lora(role_dir, refs, config)
        if not refs:  # save_lora_only: the LoRA factors alone, the base comes from --base
            if base_dir is None:
                raise RlexportError("base-unresolved", "the verl checkpoint holds only LoRA factors "
                                    "(save_lora_only)", file=role_dir, hint="pass --base with the base model")
            refs = model_weights(base_dir)
    else:
        found = detect_head(config, refs, file=config_dir / "config.json")
        if found is not None:  # the critic: Qwen2ForTokenClassification under a ForCausalLM config
            info, head = found
            head_file = Path(head[0].origin)
            refs = [r for r in refs if r.name not in {h.name for h in head}]
            config = causal_config(config, file=config_dir / "config.json")
            stage = "critic"
    step = role_dir.parent
    pieces = tuple(Piece("trainer-state", step / r, f"the run's {r} at this step; export it by passing its path")
                   for r in ROLES if r != role_dir.name and is_role_dir(step / r))
    run = step.parent if STEP_RE.match(step.name) else None
    if run is not None:
        pieces += tuple(Piece("checkpoint", s, f"another verl step; export it with --tag {s.name}")
                        for s in _steps(run) if s != step)
    return Source(
        kind="verl", path=path, producer="verl", stage=stage, config=config, config_dir=config_dir,
        weights=tuple(refs), adapter=adapter, value_head=tuple(head), value_head_file=head_file,
        tokenizer_dirs=tuple(d for d in (hf, base_dir) if d is not None and has_tokenizer(d)),
        base_dir=base_dir, base_config=read_json(base_dir / "config.json") if base_dir else None,
        pieces=pieces, head_info=info,
    )


def tracker(run: Path) -> int | None:
    """The step latest_checkpointed_iteration.txt names (None: absent, or caught mid-write: verl opens it with
    "w", so a reader may see it empty)."""
    try:
        text = (run / ITER_FILE).read_text(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def steps(path: Path) -> list | None:
    """The registry's hook: a run folder's global_step_N/, oldest first. verl's trainer writes the tracker file
    after every role's files and the dataloader state (`RayPPOTrainer._save_checkpoint`), so a step is complete
    once the tracker names it or a later step; a step above it is still being written."""
    from . import Step
    path = Path(path)
    if is_role_dir(path) or is_step_dir(path):
        return None
    found = _steps(path)
    if not found:
        return None
    last = tracker(path)
    out = []
    for p in found:
        n = int(STEP_RE.match(p.name).group(1))
        done = last is not None and n <= last
        why = "" if done else (f"{ITER_FILE} names step {last}" if last is not None else
                               f"{ITER_FILE} is being written" if (path / ITER_FILE).exists() else
                               f"no {ITER_FILE} yet")
        out.append(Step(p.name, p, done, why))
    return out

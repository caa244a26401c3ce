"""verl Megatron checkpoints (`MegatronCheckpointManager`): torch distributed checkpoints, read without Megatron.

Layout (verl 0.9.1, "layout schema v2"): `<run>/latest_checkpointed_iteration.txt`, `<run>/global_step_N/actor/`
(and `critic/`) with `model/dist_ckpt/` (megatron-core torch_dist: `.metadata`, `__R_K.distcp`, `common.pt`,
`metadata.json`), `optimizer/dist_ckpt/`, `extra/dist_ckpt/`, `transformer_config.json`, and `ckpt_contents.json`,
which rank 0 writes last: a role folder without it is a save that did not finish. `model/huggingface/` holds the
config and tokenizer only when the save contents asked for them (else `--base`). Older verl: `actor/dist_ckpt/`
(model, optimizer and rng state in one) beside `actor/huggingface/`, and no manifest.

The tensors are read through dcp.py (allowlisted `.metadata`, chunks as lazy byte ranges) and named by
megatron_names.py, whatever TP x PP x EP layout saved them. The critic's output layer is verl's
`LinearForLastLayer(hidden, 1, bias=False)`: `output_layer.weight` [1, H], a value per token on the final-normed
hidden state, exported as the token-classification value model.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import RlexportError
from . import Piece, Source, Step
from .access import read_json
from .common import has_tokenizer, resolve_base
from .dcp import open_index, ref
from .megatron_names import hf_refs, layout, optimizer_state, vocab_facts
from .verl import ROLES, STEP_RE

HINT = "copy the whole global_step_N/ folder of the run again from the training machine"
MANIFEST = "ckpt_contents.json"


def dist_dir(role: Path) -> Path | None:
    try:
        return next((d for d in (role / "model" / "dist_ckpt", role / "dist_ckpt") if (d / ".metadata").is_file()))
    except (OSError, StopIteration):
        return None


def is_role(path: Path) -> bool:
    try:
        return dist_dir(path) is not None or ((path / MANIFEST).is_file() and (path / "model").is_dir())
    except OSError:
        return False


def incomplete(role: Path) -> str:
    """Why verl did not finish saving this role folder ("" when it did)."""
    if (role / MANIFEST).is_file():
        return "" if dist_dir(role) else "no model/dist_ckpt/.metadata (the model was not saved as Megatron shards)"
    if (role / "dist_ckpt" / ".metadata").is_file():
        return ""  # verl before the v2 layout wrote no manifest
    return f"no {MANIFEST} (verl writes it last: the save did not finish)"


def _step_roles(step: Path) -> list[Path]:
    return [step / r for r in ROLES if is_role(step / r)]


def _step_paths(run: Path) -> list[Path]:
    try:
        found = [p for p in run.iterdir() if STEP_RE.match(p.name) and _step_roles(p)]
    except OSError:
        return []
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def steps(path: Path) -> list[Step] | None:
    """The registry's hook: the run's global_step_N/ folders, each complete when all its roles are."""
    found = _step_paths(Path(path))
    if not found:
        return None
    out = []
    for s in found:
        why = "; ".join(f"{r.name}/: {w}" for r in _step_roles(s) if (w := incomplete(r)))
        out.append(Step(s.name, s, not why, why))
    return out


def select(path: Path, *, tag: str | None = None, adapter: str | None = None) -> Path | None:
    """The registry's hook: the step `--tag` names in a verl Megatron run (None: no tag, or not this format)."""
    return step_dir(Path(path), tag) if tag is not None and detect(Path(path)) else None


def step_dir(path: str | Path, tag: str) -> Path:
    """The run folder's `global_step_N/` for `--tag global_step_N` (or N)."""
    name = f"global_step_{tag}" if tag.isdigit() else tag
    found = [p for p in _step_paths(Path(path)) if p.name == name]
    if not found:
        have = ", ".join(p.name for p in _step_paths(Path(path))) or "none"
        raise RlexportError("tag-not-found", f"no verl Megatron checkpoint '{tag}' here (steps: {have})", file=path,
                            hint="pass one of the global_step_N/ folders listed with --tag")
    return found[0]


def detect(path: Path) -> bool:
    return bool(is_role(path) or _step_roles(path) or _step_paths(path))


def locate(path: Path) -> Path:
    """The role folder to read: the one passed, the step's actor/ (else critic/), or the run's newest complete step."""
    if is_role(path):
        role = path
    elif roles := _step_roles(path):
        role = roles[0]
    else:
        found = steps(path) or []
        done = [s for s in found if s.complete]
        if not done:
            last = found[-1]
            raise RlexportError("incomplete-checkpoint", f"no complete verl Megatron step here ({last.tag}: "
                                f"{last.why})", file=last.path, hint=HINT)
        return locate(done[-1].path)
    if why := incomplete(role):
        raise RlexportError("incomplete-checkpoint", f"verl did not finish saving this checkpoint: {why}",
                            file=role, hint="pass an earlier step (rlexport inspect RUN lists the complete ones)")
    return role


def _manifest(role: Path) -> dict:
    return read_json(role / MANIFEST) if (role / MANIFEST).is_file() else {}


def read(path: Path, *, base=None) -> Source:
    role = locate(path)
    ddir = dist_dir(role)
    hf = next((d for d in (role / "model" / "huggingface", role / "huggingface") if (d / "config.json").is_file()),
              None)
    base_dir = resolve_base(base, relative_to=role, explicit=True) if base is not None else None
    if (config_dir := hf or base_dir) is None:
        raise RlexportError("missing-config", "the verl Megatron checkpoint has no model/huggingface/config.json "
                            "(verl saves it only with hf_model in save_contents)", file=role,
                            hint="pass --base with the model the run started from (config and tokenizer)")
    config = read_json(config_dir / "config.json")
    index = open_index(ddir, hint=HINT)
    critic = role.name == "critic" or (_manifest(role).get("role") == "critic")
    keep = None
    if critic:  # verl's LinearForLastLayer(hidden, 1, bias=False) in place of the LM head
        head_st = index.tensors.get("output_layer.weight")
        if head_st is None or len(head_st.shape) != 2 or head_st.shape[0] != 1:
            raise RlexportError("value-head-missing", "a verl Megatron critic without its [1, hidden] output_layer."
                                f"weight (found {list(head_st.shape) if head_st else 'none'})",
                                file=ddir / ".metadata", hint=HINT)
        keep = (lambda k: k.startswith(("embedding.", "decoder.")) and "_extra_state" not in k)
    refs, facts = hf_refs(index, config, hint=HINT, keep=keep)
    value_head, head_info, stage = (), None, None
    if critic:
        from .value_heads import HeadInfo
        value_head = (ref(head_st, "output_layer.weight", hint=HINT, file=ddir / ".metadata"),)
        head_info, stage = HeadInfo("token-classification", "output_layer", "token"), "critic"
        config = {**config, "tie_word_embeddings": False}
    step = role.parent
    tok = tuple(d for d in (hf, base_dir) if d is not None and has_tokenizer(d))
    pieces = tuple(Piece("trainer-state", r, f"the run's {r.name} at this step; export it by passing its path")
                   for r in _step_roles(step) if r != role)
    if STEP_RE.match(step.name):
        pieces += tuple(Piece("checkpoint", s, f"another verl step; export it with --tag {s.name}")
                        for s in _step_paths(step.parent) if s != step)
    return Source(kind="verl-megatron", path=path, producer="verl", stage=stage, config=config, config_dir=config_dir,
                  weights=tuple(refs), value_head=value_head, head_info=head_info, tokenizer_dirs=tok,
                  base_dir=base_dir, pieces=pieces, value_head_file=ddir / ".metadata" if critic else None,
                  base_config=read_json(base_dir / "config.json") if base_dir else None)


def inspect_facts(src: Source) -> dict:
    """What `inspect` shows beyond the Source: trainer, parallel layout, padded vs real vocabulary, optimizer state."""
    role = locate(Path(src.path))
    index = open_index(dist_dir(role), hint=HINT)
    opt = optimizer_state(index, role / "optimizer" / "dist_ckpt")
    return {"trainer": "verl (Megatron backend)", "role": role.name, "parallel_layout": layout(index),
            **vocab_facts(index, src.config), "optimizer_state": opt}

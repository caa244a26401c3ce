"""Helpers shared by format modules: base resolution, value heads, tokenizer lookup, trainer hints."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import RlexportError
from ..tensors import TensorRef
from .files import check_index, refs_of, weight_files
from .value_heads import TRL_PREFIXES, VALUE_HEAD_FILES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file() \
        or (folder / "vocab.json").is_file()


def resolve_base(hint: str | Path | None, *, relative_to: Path, explicit: bool) -> Path:
    """Find the base model folder: a local path (relative paths tried from the checkpoint and its parents,
    as trainers often record them relative to their working dir), else a hub id in the local HF cache."""
    if hint is None or str(hint) == "":
        raise RlexportError("base-unresolved", "the adapter does not name its base model", file=relative_to,
                            hint="pass --base PATH_OR_HUB_ID")
    hint_path = Path(hint).expanduser()
    candidates = [hint_path] if hint_path.is_absolute() else \
        [Path.cwd() / hint_path] if explicit else []
    if not hint_path.is_absolute():
        candidates += [p / hint_path for p in [relative_to, *relative_to.parents][:4]]
    for c in candidates:
        if (c / "config.json").is_file():
            return c.resolve()
    cached = _from_hf_cache(str(hint))
    if cached is not None:
        return cached
    how = "--base" if explicit else "adapter_config.json's base_model_name_or_path"
    raise RlexportError("base-unresolved", f"base model '{hint}' (from {how}) is neither a local folder with "
                        "config.json nor in the local Hugging Face cache", file=relative_to,
                        hint="pass --base with the base model's folder (or download it into the HF cache first)")


def _from_hf_cache(repo_id: str) -> Path | None:
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import snapshot_download
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # any miss (not cached, invalid id, offline) means "not resolvable locally"
        return None
    return path if (path / "config.json").is_file() else None


def find_value_head(folder: Path, weights: list[TensorRef]) -> tuple[tuple[TensorRef, ...], Path | None]:
    """The TRL/LLaMA-Factory value head, inside the weights or in a file beside them."""
    inside = tuple(r for r in weights if r.name.startswith(TRL_PREFIXES))
    if inside:
        return _ordered(inside), Path(inside[0].origin)
    for name in VALUE_HEAD_FILES:
        f = folder / name
        if f.is_file():
            refs = tuple(r for r in refs_of([f]) if r.name.startswith(TRL_PREFIXES))
            if refs:
                return _ordered(refs), f
    return (), None


def _ordered(refs: tuple[TensorRef, ...]) -> tuple[TensorRef, ...]:
    # weight first, then bias: the order heads.py expects.
    return tuple(sorted(refs, key=lambda r: (not r.name.endswith("weight"), r.name)))


def trainer_stage(folder: Path, has_head: bool) -> tuple[str, str | None]:
    """(producer, stage) from the files trainers leave beside the weights; never unpickles anything."""
    producer = "transformers"
    card = folder / "README.md"
    if card.is_file() and "llama-factory" in card.read_text(errors="replace")[:2000]:
        producer = "llama-factory"
    if (folder / "trainer_log.jsonl").is_file():
        producer = "llama-factory"  # LLaMA-Factory's LogCallback writes this file
    if not has_head:
        return producer, None
    logs = ""
    for name in ("trainer_log.jsonl", "trainer_state.json"):
        f = folder / name
        if f.is_file():
            logs += f.read_text(errors="replace")[:200_000]
    if '"reward"' in logs or '"ppo/' in logs or "objective/kl" in logs:
        return producer, "ppo"
    if producer == "llama-factory":
        return producer, "rm"  # LF writes a value head only for ppo and rm; ppo always logs a reward
    return producer, None


def model_weights(folder: Path) -> list[TensorRef]:
    files = weight_files(folder)
    if not files:
        raise RlexportError("missing-weights", "no model weights (model*.safetensors / pytorch_model*.bin)",
                            file=folder, hint="pass the folder that holds the model weights")
    refs = refs_of(files)
    check_index(folder, refs)
    return refs


def pieces_beside(folder: Path):
    from . import Piece  # local import: formats/__init__ imports format modules lazily
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (sub / "adapter_config.json").is_file() and not sub.name.startswith("checkpoint-"):
            out.append(Piece("reward-adapter" if sub.name == "reward" else "extra-adapter", sub,
                             f"adapter '{sub.name}' saved beside the policy; its head is not saved with it"))
        elif sub.name.startswith("checkpoint-"):
            out.append(Piece("checkpoint", sub, "intermediate checkpoint; export it by passing its path"))
        elif sub.name.startswith("global_step"):
            out.append(Piece("trainer-state", sub, "raw DeepSpeed checkpoint (fp32 optimizer partitions); "
                             f"export it instead with --tag {sub.name}"))
    return tuple(out)


def json_or_empty(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

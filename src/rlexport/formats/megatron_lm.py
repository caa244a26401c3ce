"""Megatron-LM `save_checkpoint` output (slime, ms-swift's Megatron mode, NeMo-RL's Megatron backend), read
without Megatron.

A save root holds `latest_checkpointed_iteration.txt` (the iteration number, or "release"; rank 0 writes it after
every rank finished) and one `iter_NNNNNNN/` per save: a torch_dist checkpoint (`.metadata`, `__R_K.distcp`,
`common.pt`, `metadata.json`). The model's tensors are Megatron GPTModel names (megatron_names.py); the same
checkpoint holds the optimizer (`optimizer.*`: with the distributed optimizer, flat fp32 buffers, often 6x the
weights) and rng / rerun state: never read. `common.pt` pickles Megatron's `args` (an argparse.Namespace full of
Megatron classes): never unpickled. So the Hugging Face config and tokenizer come from `--base` (the HF model the
run started from), and Megatron's padded vocabulary is cut back to the config's `vocab_size`.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import RlexportError
from . import Source, Step
from .common import has_tokenizer, resolve_base
from .dcp import open_index
from .files import read_json
from .megatron_names import hf_refs, layout, optimizer_state, vocab_facts

TRACKER = "latest_checkpointed_iteration.txt"
ITER_RE = re.compile(r"^iter_(\d{7,})$")
HINT = "copy the whole iter_NNNNNNN/ folder (.metadata and every __R_K.distcp) again from the training machine"


def is_iter(path: Path) -> bool:
    """An iteration folder, finished (.metadata) or not (common.pt is written first)."""
    if not (ITER_RE.match(path.name) or path.name == "release"):
        return False
    try:
        return (path / ".metadata").is_file() or (path / "common.pt").is_file()
    except OSError:
        return False


def _iters(root: Path) -> list[Path]:
    try:
        found = [p for p in root.iterdir() if ITER_RE.match(p.name) and p.is_dir()]
    except OSError:
        return []
    return sorted(found, key=lambda p: int(ITER_RE.match(p.name).group(1)))


def _tracker(root: Path) -> str | None:
    t = root / TRACKER
    if not t.is_file():
        return None
    n = t.read_text(errors="replace").strip()
    return "release" if n == "release" else f"iter_{int(n):07d}" if n.isdigit() else n


def is_root(path: Path) -> bool:
    return any(is_iter(p) for p in _iters(path)) or ((path / TRACKER).is_file() and bool(_iters(path)))


def detect(path: Path) -> bool:
    return is_iter(path) or is_root(path)


def incomplete(it: Path) -> str:
    """Why this iteration is not a finished save ("" when it is): DCP writes .metadata after every file."""
    if not (it / ".metadata").is_file():
        return "no .metadata (torch_dist writes it last: the save did not finish)"
    try:
        open_index(it, hint=HINT)
    except RlexportError as e:
        return f"{e.message} ({Path(e.file).name if e.file else it.name})"
    return ""


def steps(path: Path) -> list[Step] | None:
    """The registry's hook: a save root's iter_NNNNNNN/ folders; one newer than the tracker is unfinished."""
    path = Path(path)
    if not is_root(path):
        return None
    tracked, out = _tracker(path), []
    last = int(tracked[5:]) if tracked and tracked.startswith("iter_") else None
    for p in _iters(path):
        why = incomplete(p)
        if not why and last is not None and int(ITER_RE.match(p.name).group(1)) > last:
            why = f"newer than {TRACKER} ({tracked}): the save did not finish"
        out.append(Step(p.name, p, not why, why))
    return out


def _by_tag(root: Path, tag: str) -> Path:
    name = f"iter_{int(tag):07d}" if tag.isdigit() else tag
    if not (root / name).is_dir():
        have = ", ".join(p.name for p in _iters(root)) or "none"
        raise RlexportError("tag-not-found", f"no Megatron-LM iteration '{tag}' here (iterations: {have})",
                            file=root, hint="pass one of the iter_NNNNNNN folders listed with --tag")
    return root / name


def select(path: Path, *, tag: str | None = None, adapter: str | None = None) -> Path | None:
    """The registry's hook: the iteration `--tag iter_NNNNNNN` (or N) names in a save root."""
    path = Path(path)
    return _by_tag(path, tag) if tag is not None and is_root(path) else None


def locate(path: Path) -> Path:
    """The iteration folder to read: the one passed, or the one the save root's tracker names."""
    if not is_iter(path):
        tracked = _tracker(path)
        if tracked is None:
            have = ", ".join(p.name for p in _iters(path))
            raise RlexportError("tracker-missing", f"no {TRACKER} in this Megatron-LM save root (iterations: {have})",
                                file=path, hint="pick one with --tag iter_NNNNNNN, or pass its folder")
        if not (path / tracked).is_dir():
            raise RlexportError("incomplete-checkpoint", f"{TRACKER} names {tracked}, which is not here",
                                file=path / TRACKER, hint="copy that iteration's folder, or pick another with --tag")
        path = path / tracked
    if not (path / ".metadata").is_file():
        raise RlexportError("incomplete-checkpoint", "Megatron-LM did not finish saving this iteration: no "
                            ".metadata (torch_dist writes it last)",
                            file=path, hint="pick an earlier iteration with --tag (rlexport inspect lists them)")
    return path


def megatron_source(it: Path, *, path: Path, base, kind: str, producer: str, tokenizer_dirs=(),
                    config_dir: Path | None = None, base_dir: Path | None = None) -> Source:
    """A Source for one torch_dist iteration folder of a Megatron GPTModel; the config from `config_dir`/--base."""
    if base_dir is None and base is not None:
        base_dir = resolve_base(base, relative_to=it, explicit=True)
    config_dir = config_dir or base_dir
    index = open_index(it, hint=HINT)
    if config_dir is None:
        emb = index.tensors.get("embedding.word_embeddings.weight")
        rows = f" (its embedding has {emb.shape[0]} rows, Megatron's padded vocabulary)" if emb else ""
        raise RlexportError("missing-config", f"a Megatron checkpoint holds no Hugging Face config{rows}, so "
                            "there is nothing to name the tensors or cut the vocabulary to", file=it,
                            hint="pass --base with the Hugging Face model the run started from")
    config = read_json(config_dir / "config.json")
    refs, _ = hf_refs(index, config, hint=HINT)
    tok = tuple(d for d in (*tokenizer_dirs, base_dir) if d is not None and has_tokenizer(d))
    return Source(kind=kind, path=path, producer=producer, stage=None, config=config, config_dir=config_dir,
                  weights=tuple(refs), tokenizer_dirs=tok, base_dir=base_dir,
                  base_config=read_json(base_dir / "config.json") if base_dir else None)


def read(path: Path, *, base=None) -> Source:
    return megatron_source(locate(path), path=path, base=base, kind="megatron-lm", producer="megatron-lm")


def inspect_facts(src: Source) -> dict:
    """Trainer, the parallel layout saved with, padded vs real vocabulary, optimizer state (never read)."""
    it = locate(Path(src.path))
    index = open_index(it, hint=HINT)
    meta = read_json(it / "metadata.json") if (it / "metadata.json").is_file() else {}
    return {"trainer": "Megatron-LM save_checkpoint (slime, ms-swift Megatron, NeMo-RL Megatron)",
            "iteration": it.name, "backend": meta.get("sharded_backend"), "parallel_layout": layout(index),
            **vocab_facts(index, src.config), "optimizer_state": optimizer_state(index)}

"""Raw DeepSpeed checkpoints: `latest` + `global_stepN/` (ZeRO-1/2/3, any world size), read without DeepSpeed.

The folder passed may be the trainer's output folder or a `checkpoint-N/` (both hold `latest` and the tag
folder, plus config.json and the tokenizer), or the tag folder itself. The tag comes from `--tag`, else
`latest`, else the only `global_step*/` folder. A trainer folder that also holds complete HF weights (ZeRO-2,
ZeRO-3 with gathering) is left to the hf / peft readers unless `--tag` asks for the raw checkpoint; one whose
weights are empty ZeRO-3 placeholders is read from here.

Names are the engine's `named_parameters()` names: `module.` (a wrapped engine) and `pretrained_model.` (TRL's
value-head wrapper) are stripped, `v_head.summary.*` becomes the value head, and a PEFT model
(`…base_layer.weight`, `…lora_A.default.weight`) is merged into its base like an adapter folder.
"""
from __future__ import annotations

import re
from pathlib import Path

from ...errors import RlexportError
from ...tensors import FLOATS
from .. import Piece, Source
from ..common import find_value_head, has_tokenizer, model_weights, pieces_beside, resolve_base, trainer_stage
from ..files import read_json, refs_of, weight_files
from .zero import MODEL_RE, OPTIM_RE, ZERO3_MODEL_RE, Zero, read_zero

TAG_RE = re.compile(r"^[^/\\]+$")
LORA_RE = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)(\.|$)")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def is_tag_dir(path: Path) -> bool:
    try:
        return path.is_dir() and any(MODEL_RE.match(p.name) or ZERO3_MODEL_RE.match(p.name) or
                                     OPTIM_RE.match(p.name) for p in path.iterdir())
    except OSError:
        return False


def _tags(path: Path) -> list[Path]:
    try:
        return sorted((p for p in path.glob("global_step*") if is_tag_dir(p)),
                      key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    except OSError:
        return []


def has_raw_checkpoint(path: Path) -> bool:
    return is_tag_dir(path) or (path / "latest").is_file() or bool(_tags(path))


def _complete_weights(path: Path) -> bool:
    """The folder holds HF or adapter weights with no [0]-shaped ZeRO-3 placeholder (headers only)."""
    files = [path / f for f in ADAPTER_FILES if (path / f).is_file()]
    if not files and (path / "config.json").is_file():
        files = weight_files(path)
    if not files:
        return False
    try:
        refs = refs_of(files)
    except RlexportError:
        return True  # damaged: let the hf / peft reader say so
    return bool(refs) and not any(r.numel == 0 and r.dtype in FLOATS for r in refs)


def detect(path: Path) -> bool:
    if is_tag_dir(path):
        return True
    return has_raw_checkpoint(path) and not _complete_weights(path)


def select(path: Path, *, tag: str | None = None, adapter: str | None = None) -> Path | None:
    """The registry's hook: the tag folder `--tag TAG` names (a name inside the checkpoint folder); None when
    there is no tag or `path` holds no raw DeepSpeed checkpoint."""
    if tag is None or not has_raw_checkpoint(Path(path)):
        return None
    return tag_dir(Path(path), tag)


def tag_dir(path: Path, tag: str) -> Path:
    if not TAG_RE.match(tag) or tag in (".", ".."):
        raise RlexportError("bad-tag", f"--tag '{tag}' is not a folder name", file=path,
                            hint="pass the name of a global_stepN/ folder, e.g. --tag global_step500")
    if is_tag_dir(path):
        if path.name == tag:
            return path
        path = path.parent
    found = path / tag
    if not is_tag_dir(found):
        have = ", ".join(p.name for p in _tags(path)) or "none"
        raise RlexportError("tag-not-found", f"no DeepSpeed checkpoint '{tag}' here (tags: {have})", file=path,
                            hint="pass one of the global_stepN/ folders listed with --tag")
    return found


def locate(path: Path) -> tuple[Path, Path]:
    """(checkpoint folder holding config.json and the tokenizer, tag folder) for a folder passed."""
    if is_tag_dir(path):
        return path.parent, path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        if not TAG_RE.match(tag or "/") or tag in (".", ".."):
            raise RlexportError("corrupt-deepspeed", f"'latest' names {tag!r}, not a folder", file=latest,
                                hint="pick the checkpoint with --tag global_stepN")
        if not is_tag_dir(path / tag):
            raise RlexportError("tag-not-found", f"'latest' names {tag} but {tag}/ holds no DeepSpeed "
                                "checkpoint", file=path / tag,
                                hint="copy the whole checkpoint folder, or pick another one with --tag")
        return path, path / tag
    tags = _tags(path)
    if len(tags) == 1:
        return path, tags[0]
    if not tags:
        raise RlexportError("missing-deepspeed", "no global_stepN/ DeepSpeed checkpoint here", file=path,
                            hint="pass the folder that holds 'latest' and global_stepN/")
    raise RlexportError("several-tags", f"{len(tags)} DeepSpeed checkpoints and no 'latest' file "
                        f"({', '.join(t.name for t in tags)})", file=path, hint="pick one with --tag")


def _strip(name: str) -> str:
    for p in ("module.", "pretrained_model."):
        if name.startswith(p):
            name = name[len(p):]
    return name


def _names(zero: Zero) -> list:
    refs = [r.renamed(_strip(r.name)) for r in zero.refs]
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise RlexportError("corrupt-deepspeed", "two parameters have the same name once wrapper prefixes are "
                            "removed", file=zero.tag_dir, hint="convert it with DeepSpeed's zero_to_fp32.py")
    if any(n.startswith("policy.") for n in names) and all(n.startswith(("policy.", "value_model.")) for n in names):
        # TRL >= 0.12 PPO wraps policy and value model together; the value model is a sequence classifier
        refs = [r.renamed(r.name[len("policy."):]) for r in refs if r.name.startswith("policy.")]
    # module order (the model's state_dict order), whatever prefixes param_shapes' names carried
    order = {_strip(n): i for i, n in enumerate(zero.module_names)}
    return sorted(refs, key=lambda r: order.get(r.name, len(order)))


def read(path: Path, *, base=None) -> Source:
    ckpt_dir, tag_dir = locate(path)
    zero = read_zero(tag_dir)
    refs = _names(zero)
    frozen = {_strip(n) for n in zero.frozen}
    head, _ = find_value_head(ckpt_dir, refs)  # inside the engine's params, else value_head.safetensors beside
    head_names = {r.name for r in head}
    refs = [r for r in refs if r.name not in head_names]
    head_file = Path(head[0].origin) if head else None
    base_dir = resolve_base(base, relative_to=ckpt_dir, explicit=True) if base is not None else None
    adapter = None
    if any(LORA_RE.search(r.name) for r in refs):
        adapter, base_dir, refs = _peft(ckpt_dir, tag_dir, refs, frozen, base)
    base_config = read_json(base_dir / "config.json") if base_dir else None
    if (ckpt_dir / "config.json").is_file() and adapter is None:
        config, config_dir = read_json(ckpt_dir / "config.json"), ckpt_dir
    elif base_config is not None:
        config, config_dir = base_config, base_dir
    else:
        raise RlexportError("missing-config", "the DeepSpeed checkpoint has no config.json beside it (a ZeRO-3 "
                            "save without gathering writes none)", file=ckpt_dir,
                            hint="pass --base with the base model's folder (its config.json and tokenizer are used)")
    producer, stage = trainer_stage(ckpt_dir, bool(head))
    if producer == "transformers" and ckpt_dir.name.startswith("checkpoint-"):
        producer, stage = trainer_stage(ckpt_dir.parent, bool(head))  # the run's logs sit above checkpoint-N/
    if producer == "transformers":
        producer = "trl" if head else "deepspeed"
    pieces = tuple(p for p in pieces_beside(ckpt_dir) if p.path != tag_dir)
    pieces += tuple(Piece("trainer-state", t, "another DeepSpeed checkpoint; export it with --tag " + t.name)
                    for t in _tags(ckpt_dir) if t != tag_dir and t not in {p.path for p in pieces})
    return Source(
        kind="deepspeed", path=path, producer=producer, stage=stage, config=config, config_dir=config_dir,
        weights=tuple(refs), adapter=adapter, value_head=head, value_head_file=head_file,
        tokenizer_dirs=tuple(d for d in (ckpt_dir, base_dir) if d is not None and has_tokenizer(d)),
        base_dir=base_dir, base_config=base_config, pieces=pieces,
    )


def _peft(ckpt_dir: Path, tag_dir: Path, refs, frozen: set[str], base):
    """A PeftModel trained under DeepSpeed: the LoRA factors (and trained full tensors) become an adapter over
    the base model's own weights; the frozen base copies in the checkpoint are not needed."""
    from ...lora import read_adapter
    cfg_file = next((d / "adapter_config.json" for d in (ckpt_dir, tag_dir) if (d / "adapter_config.json").is_file()),
                    None)
    if cfg_file is None:
        raise RlexportError("adapter-without-config", "the DeepSpeed checkpoint holds a PEFT model (lora_A/lora_B "
                            "tensors) but no adapter_config.json gives its rank and alpha", file=tag_dir,
                            hint="copy adapter_config.json from the training run beside 'latest'")
    config = read_json(cfg_file)
    trained = [r for r in refs if r.name not in frozen]
    adapter = read_adapter(cfg_file.parent, config, trained)
    base_dir = resolve_base(base if base is not None else config.get("base_model_name_or_path"),
                            relative_to=ckpt_dir, explicit=base is not None)
    adapter = adapter.bind(read_json(base_dir / "config.json"))
    return adapter, base_dir, model_weights(base_dir)


def steps(path: Path) -> list | None:
    """The registry's hook: the tag folders of a raw DeepSpeed save folder (OpenRLHF's `ckpt/_actor`), oldest
    first. `engine.save_checkpoint` writes `latest` on rank 0 after every rank saved its files: a tag is complete
    once `latest` names it or a later one. A folder with its own config.json is one checkpoint (an HF Trainer
    `checkpoint-N/`), not a run: None; the Trainer's run folder is listed by the hf hook."""
    from .. import Step
    path = Path(path)
    if is_tag_dir(path) or (path / "config.json").is_file():
        return None
    tags = _tags(path)
    if not tags:
        return None
    try:
        latest = (path / "latest").read_text(errors="replace").strip()
    except OSError:
        latest = ""
    last = int(re.sub(r"\D", "", latest) or -1) if latest else None
    out = []
    for t in tags:
        n = int(re.sub(r"\D", "", t.name) or 0)
        done = last is not None and n <= last
        out.append(Step(t.name, t, done, "" if done else (f"'latest' names {latest}" if last is not None
                                                          else "no 'latest' file yet")))
    return out

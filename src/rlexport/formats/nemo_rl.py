"""NeMo-RL policy checkpoints (`CheckpointManager` + the policy worker's `save_checkpoint`), read without NeMo-RL.

Layout (NeMo-RL 0.6): `<checkpoint_dir>/step_N/` with `config.yaml` (the resolved master config),
`training_info.json`, `policy/weights/`, `policy/optimizer/` (never read) and `policy/tokenizer/`. The manager saves
into `tmp_step_N/` and renames it to `step_N/` when every rank is done: only `step_N/` is complete.
`policy/weights/` is, by worker:
- DTensor (v1, `native_checkpoint.save_checkpoint`): a torch DCP of `{"model": ModelState}`, keys `model.` + the
  Hugging Face name, fp32 (dcp.py);
- DTensor v2 / automodel: `weights/model/` with safetensors shards of the Hugging Face names (`consolidated/`
  when save_consolidated), or a DCP of them (model_save_format torch_save);
- Megatron: a Megatron-LM save root (`iter_NNNNNNN/` torch_dist, Megatron names; megatron_lm.py).
No config.json is saved: `config.yaml`'s `policy.model_name` is the base when it resolves locally, else `--base`.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import RlexportError
from . import Source, Step
from .common import has_tokenizer, refs_of, resolve_base, weight_files
from .dcp import open_index, ref
from .files import read_json
from . import megatron_lm

STEP_RE = re.compile(r"^(tmp_)?step_(\d+)$")
HINT = "copy the whole step_N/ folder again from the training machine"
PREFIX = "model."  # dcp.save({"model": ModelState(model)}): one `model.` before the Hugging Face name


def _weights(step: Path) -> Path:
    return step / "policy" / "weights"


def is_step(path: Path) -> bool:
    try:
        return STEP_RE.match(path.name) is not None and _weights(path).is_dir()
    except OSError:
        return False


def _steps(run: Path) -> list[Path]:
    try:
        found = [p for p in run.iterdir() if is_step(p)]
    except OSError:
        return []
    return sorted(found, key=lambda p: (int(STEP_RE.match(p.name).group(2)), p.name.startswith("tmp_")))


def detect(path: Path) -> bool:
    return is_step(path) or bool(_steps(path))


def incomplete(step: Path) -> str:
    if step.name.startswith("tmp_"):
        return "NeMo-RL renames tmp_step_N to step_N when every rank has saved: the save did not finish"
    return ""


def steps(path: Path) -> list[Step] | None:
    """The registry's hook: a NeMo-RL checkpoint_dir's step_N/ folders (tmp_step_N/ is an unfinished save)."""
    found = _steps(Path(path))
    return [Step(p.name, p, not incomplete(p), incomplete(p)) for p in found] or None


def select(path: Path, *, tag: str | None = None, adapter: str | None = None) -> Path | None:
    path = Path(path)
    if tag is None or not _steps(path):
        return None
    name = f"step_{tag}" if tag.isdigit() else tag
    if not is_step(path / name):
        have = ", ".join(p.name for p in _steps(path))
        raise RlexportError("tag-not-found", f"no NeMo-RL step '{tag}' here (steps: {have})", file=path,
                            hint="pass one of the step_N folders listed with --tag")
    return path / name


def locate(path: Path) -> Path:
    if not is_step(path):
        done = [p for p in _steps(path) if not incomplete(p)]
        if not done:
            raise RlexportError("incomplete-checkpoint", "no finished NeMo-RL step here (only tmp_step_N/ folders: "
                                "the save did not finish)", file=path, hint=HINT)
        path = done[-1]  # the newest complete step, as NeMo-RL's get_latest_checkpoint_path picks it
    if why := incomplete(path):
        raise RlexportError("incomplete-checkpoint", why, file=path, hint="pass an earlier step_N folder")
    return path


def model_name(step: Path) -> str | None:
    """`policy.model_name` of the step's config.yaml (yaml.safe_load: plain data only)."""
    f = step / "config.yaml"
    if not f.is_file():
        return None
    try:
        import yaml  # huggingface_hub's dependency
        cfg = yaml.safe_load(f.read_text(encoding="utf-8"))
    except Exception:  # an unreadable config.yaml only loses the base hint
        return None
    name = (cfg.get("policy") or {}).get("model_name") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) and name else None


def _base(step: Path, base) -> Path:
    if base is not None:
        return resolve_base(base, relative_to=step, explicit=True)
    name = model_name(step)
    if name:
        try:
            return resolve_base(name, relative_to=step, explicit=False)
        except RlexportError:
            pass
    raise RlexportError("missing-config", f"NeMo-RL saves no config.json, and config.yaml's policy.model_name "
                        f"{name!r} is not a local folder nor in the Hugging Face cache", file=step / "config.yaml",
                        hint="pass --base with the model the run started from")


def read(path: Path, *, base=None) -> Source:
    step = locate(path)
    wdir, tokdir = _weights(step), step / "policy" / "tokenizer"
    base_dir = _base(step, base)
    tok = (tokdir,) if has_tokenizer(tokdir) else ()
    if megatron_lm.is_root(wdir) or megatron_lm.is_iter(wdir):
        return megatron_lm.megatron_source(megatron_lm.locate(wdir), path=path, base=None, kind="nemo-rl",
                                           producer="nemo-rl", tokenizer_dirs=tok, base_dir=base_dir)
    config = read_json(base_dir / "config.json")
    dcp_dir = next((d for d in (wdir, wdir / "model") if (d / ".metadata").is_file()), None)
    if dcp_dir is not None:  # DTensor v1: weights/; automodel's torch_save format: weights/model/
        index = open_index(dcp_dir, hint=HINT)
        refs = [ref(st, k, hint=HINT, file=dcp_dir / ".metadata") for k, st in index.tensors.items()]
    elif files := weight_files(wdir / "model" / "consolidated") or weight_files(wdir / "model"):
        refs = refs_of(files)  # automodel safetensors: the consolidated HF shards when saved, else the model's
    else:
        raise RlexportError("missing-weights", "policy/weights/ holds neither a DCP checkpoint (.metadata), "
                            "safetensors under model/, nor a Megatron iter_NNNNNNN/", file=wdir, hint=HINT)
    refs = _unwrapped(refs)
    if not refs:
        raise RlexportError("missing-weights", "the policy's checkpoint holds no tensors", file=wdir, hint=HINT)
    tok = tok + ((base_dir,) if has_tokenizer(base_dir) else ())
    return Source(kind="nemo-rl", path=path, producer="nemo-rl", stage=None, config=config, config_dir=base_dir,
                  weights=tuple(sorted(refs, key=lambda r: r.name)), tokenizer_dirs=tok, base_dir=base_dir,
                  base_config=config)


def _unwrapped(refs: list) -> list:
    """HF names: `dcp.save({"model": ModelState(model)})` puts one `model.` before each (`model.model.layers...`,
    `model.lm_head.weight`); strip it only where it is there, so plain HF names pass unchanged."""
    names = [r.name for r in refs]
    if names and all(n.startswith(PREFIX) for n in names) and \
            any(n.startswith((PREFIX + "model.", PREFIX + "lm_head.")) for n in names):
        return [r.renamed(r.name[len(PREFIX):]) for r in refs]
    return refs


def inspect_facts(src: Source) -> dict:
    step = locate(Path(src.path))
    odir = step / "policy" / "optimizer"
    opt = None
    if (odir / ".metadata").is_file():
        opt = {"bytes": sum(open_index(odir, hint=HINT).files.values()), "read": False, "where": str(odir)}
    wdir = _weights(step)
    fmt = "megatron" if megatron_lm.is_root(wdir) or megatron_lm.is_iter(wdir) else \
        "dcp" if (wdir / ".metadata").is_file() else "safetensors"
    return {"trainer": "NeMo-RL", "step": step.name, "weights_format": fmt, "model_name": model_name(step),
            "optimizer_state": opt}

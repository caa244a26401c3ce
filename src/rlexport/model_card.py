"""README.md of an export: a Hugging Face model card (YAML front matter as the Hub reads it) and where it came from.

`hf upload ORG/NAME OUT` then publishes a folder whose card says what it is: `library_name: transformers`,
`base_model` (when the trainer started from a Hub id), `tags` (rlexport, the trainer, the stage), `pipeline_tag`;
below it the provenance (input format and trainer, step, adapter, dtype, quantization, rlexport version,
`verify`'s verdict) and the command that serves it. A card the trainer saved in the checkpoint is kept below, its
own front matter dropped (a second YAML block would be body text to the Hub, and its `library_name: peft` /
`base_model: ../base` describe the adapter, not this folder).

`export --verify` commits the folder first and verifies the committed folder (what vLLM will load, at the path the
user gave), then `record_verdict` replaces README.md in one `os.replace`: a reader sees the card before or after
the verdict, never half of it, and a failed verify leaves the folder for diagnosis, as before.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .version import __version__

CARD = "README.md"
VERIFY_ROW = "| `rlexport verify` |"   # the row record_verdict rewrites
TRAINERS = {"llama-factory": "LLaMA-Factory", "trl": "TRL", "openrlhf": "OpenRLHF", "verl": "verl",
            "peft": "PEFT", "transformers": "transformers", "deepspeed": "DeepSpeed"}
STEP = re.compile(r"^(?:global_step_?|checkpoint-|iter_?|step_?)(\d+)$")
_FRONT = re.compile(r"\A---\s*\n.*?\n---\s*(?:\n|\Z)", re.S)


def _tag(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def hub_id(name, *, relative_to: Path | None = None) -> str | None:
    """`name` when it reads as a Hub repo id (org/name) and is no local path (from the working directory or
    `relative_to`); a Hub cache snapshot folder (.../models--org--name/snapshots/<rev>) gives its repo id."""
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        return None
    text = str(name)
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", text)
    if m:
        text = f"{m[1]}/{m[2]}"
    elif text.count("/") != 1 or text.startswith((".", "/", "~")) or Path(text).exists() or \
            (relative_to is not None and (relative_to / text).exists()):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def base_model(src) -> str | None:
    adapter_cfg = getattr(src.adapter, "config", None) or {}
    for name in (adapter_cfg.get("base_model_name_or_path"), (src.config or {}).get("_name_or_path"),
                 (src.base_config or {}).get("_name_or_path"), src.base_dir):
        found = hub_id(name, relative_to=Path(src.path))
        if found:
            return found
    return None


def step(src) -> str | None:
    """The training step, from the checkpoint's folder names (global_step_N, checkpoint-N, iter_N)."""
    for part in reversed(Path(src.path).absolute().parts):
        m = STEP.match(part)
        if m:
            return m[1]
    return None


def adapter_line(adapter) -> str:
    if adapter is None:
        return "none (full weights)"
    cfg = adapter.config or {}
    kind = str(cfg.get("peft_type") or "LORA").upper()
    variant = {"LORA": "LoRA", "LOHA": "LoHa", "LOKR": "LoKr", "IA3": "IA3"}.get(kind, kind)
    if cfg.get("use_dora"):
        variant = "DoRA"
    if cfg.get("use_rslora"):
        variant += " (rsLoRA scaling)"
    alpha = cfg.get("lora_alpha", cfg.get("alpha"))
    rank = f", r={adapter.rank}" + (f", alpha={alpha}" if alpha is not None else "") if adapter.rank else ""
    return f"{variant}{rank}, merged into the base in float32"


def quantization_line(config: dict) -> str:
    q = config.get("quantization_config")
    if not q:
        return "none"
    from .quant.schemes import SCHEMES
    fmt = q.get("format") if isinstance(q, dict) else None
    scheme = next((s for s in SCHEMES.values() if s.format == fmt), None)
    return f"{scheme.name} ({scheme.preset}, compressed-tensors `{fmt}`)" if scheme else f"compressed-tensors `{fmt}`"


def serve_command(target: str) -> str:
    if target == "policy":
        return "vllm serve MODEL"
    return "vllm serve MODEL --runner pooling  # POST /pooling, task token_classify: the value of every token"


def card_text(p, *, verdict: str | None = None) -> str:
    """The whole README.md for the export planned in `p` (export.Plan)."""
    from huggingface_hub import ModelCardData
    from .tensors import dtype_name
    src = p.source
    trainer = TRAINERS.get(src.producer, src.producer)
    data = ModelCardData(library_name="transformers", base_model=base_model(src),
                         tags=[t for t in ("rlexport", _tag(src.producer or ""), _tag(src.stage or "")) if t],
                         pipeline_tag="text-generation" if p.target == "policy" else "token-classification")
    rows = [("input", f"`{src.kind}` checkpoint written by {trainer}" + (f", stage {src.stage}" if src.stage else "")),
            ("step", step(src) or "unknown"), ("adapter", adapter_line(src.adapter)),
            ("target", "policy (causal LM)" if p.target == "policy" else
             f"value: `{p.config['architectures'][0]}`, score head in float32, serves the "
             f"{(p.config.get('rlexport') or {}).get('serves', 'value')}"),
            ("dtype", dtype_name(p.dtype)), ("quantization", quantization_line(p.config)),
            ("rlexport", __version__)]
    lines = ["---", data.to_yaml(), "---", "",
             f"# {'Policy' if p.target == 'policy' else 'Value model'} exported by rlexport", "",
             "## Provenance", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows),
             f"{VERIFY_ROW} {verdict or 'not run at export time'} |", "",
             "## Serve it", "", "MODEL: this folder, or the Hub repo id it is uploaded to.", "", "```bash",
             serve_command(p.target), "```", ""]
    trainer_card = _trainer_card(Path(src.path))
    if trainer_card:
        lines += ["## The trainer's model card", "", trainer_card.rstrip(), ""]
    return "\n".join(lines)


def _trainer_card(path: Path) -> str | None:
    f = path / CARD if path.is_dir() else None
    if f is None or not f.is_file():
        return None
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return _FRONT.sub("", text, count=1).strip() or None


def write_card(p, folder: Path) -> None:
    (Path(folder) / CARD).write_text(card_text(p), encoding="utf-8")


def verdict_of(report: dict) -> str:
    """One cell: verify's verdict from its JSON report."""
    counts = {}
    for c in report.get("checks", []):
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    head = "passed" if report.get("ok") else "FAILED: " + ", ".join(report.get("failed", []))
    return f"{head} (engine {report.get('engine')}; {tally}; rlexport {report.get('rlexport_version', __version__)})"


def record_verdict(folder: Path, report: dict) -> bool:
    """Put verify's verdict into the export's README.md, replacing the file atomically; False when the folder
    has no rlexport card (a folder rlexport did not write, or one whose card was edited by hand)."""
    card = Path(folder) / CARD
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    lines = text.split("\n")
    at = next((i for i, ln in enumerate(lines) if ln.startswith(VERIFY_ROW)), None)
    if at is None:
        return False
    lines[at] = f"{VERIFY_ROW} {verdict_of(report)} |"
    tmp = card.with_name(f".{CARD}.rlexport-tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, card)
    return True

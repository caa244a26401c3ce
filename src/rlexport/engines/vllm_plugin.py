"""vLLM load format `rlexport`: serve a raw training checkpoint with no export step and no second copy on disk.

vLLM calls `register()` through the `vllm.general_plugins` entry point in every process it starts (driver, engine
core, workers: the CPU platform spawns them, so an import in the driver would not reach them). The loader takes
its own keys out of `--model-loader-extra-config` (DefaultModelLoader refuses unknown ones) and hands vLLM's
`load_weights` rlexport's tensor stream instead of the folder's files: the same plan `export` writes (wrappers
stripped, adapter merged in float32, heads renamed and normalisation folded, one cast to the engine's dtype),
one tensor at a time. Under tensor parallelism each rank receives whole tensors and its parameters' weight
loaders slice them, exactly as with files on disk; a LoRA delta merged into the whole tensor is right on every rank.

    vllm serve BASE --load-format rlexport --model-loader-extra-config '{"checkpoint": "CKPT"}'

`rlexport.vllm_args()` / `rlexport serve` work out the rest (model config folder, tokenizer, hf_overrides).
"""
from __future__ import annotations

import copy
from pathlib import Path

LOAD_FORMAT = "rlexport"
# our keys in --model-loader-extra-config; the rest goes to vLLM's DefaultModelLoader
OPTIONS = ("checkpoint", "base", "target", "normalize", "adapter", "tag")


def register() -> None:
    """The `vllm.general_plugins` entry point: make `--load-format rlexport` known to this process."""
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    @register_model_loader(LOAD_FORMAT)
    class RlexportLoader(DefaultModelLoader):
        def __init__(self, load_config):
            extra = dict(load_config.model_loader_extra_config or {})
            self.options = {k: extra.pop(k) for k in OPTIONS if k in extra}
            if "checkpoint" not in self.options:
                raise ValueError("--load-format rlexport needs the training checkpoint: --model-loader-extra-config "
                                 "'{\"checkpoint\": \"PATH\"}' (rlexport serve CKPT writes the whole command)")
            rest = copy.copy(load_config)
            rest.model_loader_extra_config = extra
            super().__init__(rest)

        def download_model(self, model_config) -> None:
            pass  # nothing to download: the checkpoint is local

        def get_all_weights(self, model_config, model):
            yield from stream(self.options, dtype=model_config.dtype)


def stream(options: dict, *, dtype):
    """(name, tensor) pairs of the export plan, loaded one at a time, cast once to the engine's dtype."""
    from ..export import plan
    from ..formats import open_checkpoint
    from ..tensors import dtype_name
    src = open_checkpoint(options["checkpoint"], base=options.get("base"), adapter=options.get("adapter"),
                          tag=options.get("tag"))
    p = plan(src, target=options.get("target", "policy"), dtype=dtype_name(dtype),
             normalize=bool(options.get("normalize", True)))
    for ref in p.tensors:
        yield ref.name, ref.load()

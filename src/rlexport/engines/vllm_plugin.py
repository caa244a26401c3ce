"""vLLM load format `rlexport`: serve a raw training checkpoint with no export step and no second copy on disk.

vLLM calls `register()` through the `vllm.general_plugins` entry point in every process it starts (driver, engine
core, workers: the CPU platform spawns them, so an import in the driver would not reach them). The loader takes
its own keys out of `--model-loader-extra-config` (DefaultModelLoader refuses unknown ones) and hands vLLM's
`load_weights` rlexport's tensor stream instead of the folder's files: the same plan `export` writes (wrappers
stripped, adapter merged in float32, heads renamed and normalisation folded, one cast to the engine's dtype),
read and merged on a thread a few tensors ahead of vLLM's loader (read_ahead). Under tensor parallelism each rank
receives whole tensors and its parameters' weight loaders slice them, exactly as with files on disk; a LoRA delta
merged into the whole tensor is right on every rank.

    vllm serve BASE --load-format rlexport --model-loader-extra-config '{"checkpoint": "CKPT"}'

`rlexport.vllm_args()` / `rlexport serve` work out the rest (model config folder, tokenizer, hf_overrides).
"""
from __future__ import annotations

import copy
import queue
import threading

LOAD_FORMAT = "rlexport"
# loaded ahead of vLLM's loader: a few decoder tensors of a 7B model (one larger tensor, an embedding, goes alone)
AHEAD_BYTES = 256 * 2**20
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
            live = _live_head_bias(model)
            for name, tensor in stream(self.options, dtype=model_config.dtype):
                if live is not None and name == "score.bias":
                    live.data.copy_(tensor.to(live.dtype))
                    continue
                yield name, tensor


def _live_head_bias(model):
    """An in-place reload (`rlexport serve --follow`) of a value model: vLLM's classification adapter attaches
    `score.bias` at the first load, re-creating it on the weight's device, which during a reload is `meta` (the
    layer is rebuilt there until its weights arrive): the reload then fails with "Cannot copy out of meta
    tensor". The bias itself stays live through the reload (vLLM never moves a `bias` to meta), so the new value
    is copied into it and the name not handed to vLLM (its "not loaded: score.bias" warning is expected).
    None at the first load (the layer is built without a bias) and for every other model."""
    import torch
    bias = getattr(getattr(model, "score", None), "bias", None)
    return bias if isinstance(bias, torch.nn.Parameter) and not bias.is_meta else None


def stream(options: dict, *, dtype):
    """(name, tensor) pairs of the export plan, loaded one at a time, cast once to the engine's dtype."""
    from ..export import plan
    from ..formats import open_checkpoint
    from ..tensors import dtype_name
    src = open_checkpoint(options["checkpoint"], base=options.get("base"), adapter=options.get("adapter"),
                          tag=options.get("tag"))
    p = plan(src, target=options.get("target", "policy"), dtype=dtype_name(dtype),
             normalize=bool(options.get("normalize", True)))
    yield from read_ahead(p.tensors, AHEAD_BYTES)


def read_ahead(refs, budget: int):
    """(name, tensor) of `refs` in order, each read and merged on a thread while vLLM places the previous ones.

    At most `budget` bytes are loaded ahead of the consumer (a tensor larger than that alone, once the consumer
    holds nothing else): memory stays bounded whatever the model's size. A tensor's bytes are given back when the
    consumer asks for the next one (vLLM has copied it into its parameter by then). An error in the thread is
    raised here, in vLLM's loader; a consumer that stops early stops the thread."""
    cond = threading.Condition()
    state = {"held": 0, "stop": False}
    ready: queue.Queue = queue.Queue()

    def produce():
        try:
            for ref in refs:
                size = ref.nbytes
                with cond:
                    cond.wait_for(lambda: state["stop"] or state["held"] == 0 or state["held"] + size <= budget)
                    if state["stop"]:
                        return
                    state["held"] += size
                ready.put((ref.name, ref.load(), size))
            ready.put(None)
        except BaseException as e:  # handed to the consumer, raised in vLLM's load
            ready.put(e)

    thread = threading.Thread(target=produce, name="rlexport-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            name, tensor, size = item
            yield name, tensor
            del tensor, item
            with cond:
                state["held"] -= size
                cond.notify()
    finally:
        with cond:
            state["stop"] = True
            cond.notify()

"""Verify at any model size: the training-time model and the export computed one module at a time.

The model is transformers' own (or PEFT's own, around it) built on the meta device: attention, RoPE, masks, norms
and LoRA math are the architecture's code. Every module that holds parameters gets its weights on entry (read
from the checkpoint, float32) and gives them back on exit, so only one module's weights are in memory at a time;
the vocabulary-sized embedding and output layer are read in row blocks. All prompts go through a layer before the
next one is read; greedy decoding keeps one KV cache per layer, and each decoding step reads the weights again.
Peak memory: the adapter's factors + one module in float32 + activations, flat in the number of layers.

Each decoder layer's output (the prompt pass) is kept, prompts x tokens x hidden, so the two runs can be compared
layer by layer: `first_divergence` names the first layer where the export leaves the reference.
"""
from __future__ import annotations

import re
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import moe
from ..formats import Source
from ..stream import Scratch, StreamLoader
from ..tensors import TensorRef
from ..transforms import clean_name

ROW_BLOCK_BYTES = 128 * 2**20  # embedding / output layer rows read at a time (float32)
Loader = Callable[[], torch.Tensor]


@dataclass
class Run:
    """A model whose parameters are read on demand, and what the prompt pass saw at each decoder layer."""

    model: torch.nn.Module
    loaders: dict[str, TensorRef]               # parameter name -> the tensor that fills it
    layer_outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> one per forward
    record: bool = False
    peak_module_bytes: int = 0


def return_freed_memory() -> None:
    """Make glibc serve large blocks with mmap, and so return them when freed. By default its threshold rises
    after the first large free (up to 32 MB), so the per-module tensors of every layer would then come from the
    heap, whose fragments are not given back: resident memory would grow with the number of layers."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (fixed: no dynamic adjustment)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _skeleton(config_dir):
    """transformers' model class on the meta device (buffers such as RoPE's inv_freq real, on the CPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(config_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _rows(ref: TensorRef) -> Callable[[int, int], torch.Tensor]:
    """Rows [start, stop) of a 2-D tensor in float32, read from the file where it can be (no whole table)."""
    load = ref.load
    if isinstance(load, StreamLoader) and load.streamable:
        def rows(start: int, stop: int) -> torch.Tensor:
            r = load.open()
            try:
                return r.rows(start, stop, Scratch()).to(torch.float32)
            finally:
                r.close()
        return rows
    return lambda start, stop: load()[start:stop].to(torch.float32)


def _block(ref: TensorRef) -> int:
    return max(1, ROW_BLOCK_BYTES // (4 * max(1, ref.shape[-1])))


def _fill(run: Run, params: list[tuple[torch.nn.Module, str, str]]) -> None:
    size = 0
    for mod, n, full in params:
        t = run.loaders[full].load().to(torch.float32)
        mod._parameters[n] = torch.nn.Parameter(t, requires_grad=False)
        size += t.nbytes
    run.peak_module_bytes = max(run.peak_module_bytes, size)


def _empty(params: list[tuple[torch.nn.Module, str, str]]) -> None:
    for mod, n, _ in params:
        p = mod._parameters[n]
        mod._parameters[n] = torch.nn.Parameter(torch.empty(p.shape, device="meta"), requires_grad=False)


def _install(run: Run, module: torch.nn.Module, params: list[tuple[torch.nn.Module, str, str]]) -> None:
    """Fill `params` (module, name, loader key) when `module` is entered, empty them when it returns."""
    params = [(m, n, full) for m, n, full in params if full in run.loaders]
    if params:
        module.register_forward_pre_hook(lambda mod, args: _fill(run, params))
        module.register_forward_hook(lambda mod, args, out: _empty(params) or out)


def _own(module: torch.nn.Module, prefix: str, *, recurse: bool = False) -> list[tuple[torch.nn.Module, str, str]]:
    mods = module.named_modules() if recurse else [("", module)]
    return [(m, n, f"{prefix}{sub + '.' if sub else ''}{n}") for sub, m in mods
            for n, p in m._parameters.items() if p is not None and p.is_meta]


def _large(run: Run, module: torch.nn.Module, prefix: str) -> bool:
    ref = run.loaders.get(f"{prefix}weight")
    return type(module) in (torch.nn.Embedding, torch.nn.Linear) and ref is not None and len(ref.shape) == 2 \
        and ref.numel * 4 > ROW_BLOCK_BYTES and module.weight.is_meta


def _blockwise_embedding(run: Run, module: torch.nn.Embedding, name: str) -> None:
    ref = run.loaders[name]
    rows = _rows(ref)

    def forward(self, ids):
        flat = ids.reshape(-1)
        out = torch.empty((flat.numel(), ref.shape[1]), dtype=torch.float32)
        for start in range(0, ref.shape[0], _block(ref)):
            stop = min(ref.shape[0], start + _block(ref))
            hit = (flat >= start) & (flat < stop)
            if hit.any():
                out[hit] = rows(start, stop)[flat[hit] - start]
        return out.reshape(*ids.shape, ref.shape[1])
    module.forward = types.MethodType(forward, module)


def _blockwise_linear(run: Run, module: torch.nn.Linear, name: str) -> None:
    ref = run.loaders[name]
    rows = _rows(ref)
    bias = run.loaders.get(name[: -len("weight")] + "bias")

    def forward(self, x):
        parts = [x.to(torch.float32) @ rows(s, min(ref.shape[0], s + _block(ref))).T
                 for s in range(0, ref.shape[0], _block(ref))]
        y = torch.cat(parts, -1)
        return y + bias.load().to(torch.float32) if bias is not None else y
    module.forward = types.MethodType(forward, module)


def attach(model: torch.nn.Module, loaders: dict[str, TensorRef]) -> Run:
    """Make `model` (meta parameters) runnable module by module; tables larger than a row block (embedding,
    output layer) read in row blocks; decoder layers record their prompt-pass output."""
    return_freed_memory()
    run = Run(model, loaders)
    inside_tuner: set[int] = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if id(module) in inside_tuner:
            continue
        if hasattr(module, "base_layer") and hasattr(module, "merge"):
            # a PEFT layer: its base weights stay for its whole forward (DoRA reads them beside the base call)
            inside_tuner |= {id(m) for m in module.base_layer.modules()}
            _install(run, module, _own(module.base_layer, f"{prefix}base_layer.", recurse=True))
        elif _large(run, module, prefix):
            (_blockwise_embedding if isinstance(module, torch.nn.Embedding) else _blockwise_linear)(
                run, module, f"{prefix}weight")
        else:
            _install(run, module, _own(module, prefix))
    for i, layer in enumerate(_decoder_layers(model)):
        layer.register_forward_hook(lambda mod, args, out, i=i: _keep(run, i, out))
    return run


def _keep(run: Run, layer: int, out):
    if run.record:
        h = (out[0] if isinstance(out, tuple) else out).detach().clone()
        run.layer_outputs.setdefault(layer, []).append(h)
    return out


def _decoder_layers(model) -> list[torch.nn.Module]:
    inner = getattr(model, "get_base_model", lambda: model)()
    body = getattr(inner, inner.base_model_prefix, inner)
    return list(getattr(body, "layers", []))


@contextmanager
def recording(run: Run, *, first_call_only: bool = True):
    """Keep the decoder layers' outputs of the prompt pass (the first forward call of the model)."""
    run.layer_outputs, run.record = {}, True
    handle = run.model.register_forward_hook(lambda *a: setattr(run, "record", False)) if first_call_only else None
    try:
        yield run
    finally:
        run.record = False
        if handle is not None:
            handle.remove()


# --- the two runs ----------------------------------------------------------------------------------------------------
def reference_run(src: Source) -> Run:
    """The training-time model: the trainer's full weights, or base + adapter through PEFT (unmerged)."""
    model = _skeleton(src.config_dir)
    # MoE: per-expert checkpoints stacked into transformers' fused expert parameters (moe.to_memory_layout)
    base = moe.to_memory_layout({clean_name(r.name): r for r in src.weights}, src.config)
    if "lm_head.weight" not in base and "model.embed_tokens.weight" in base:  # tied: one stored table
        base["lm_head.weight"] = base["model.embed_tokens.weight"]
    if src.adapter is None:
        return attach(model, base)
    peft_model = _peft(model, src, base)
    loaders = {}
    for name, p in peft_model.named_parameters():
        if p.is_meta and plain_name(name) in base:
            loaders[name] = base[plain_name(name)]
    return attach(peft_model, loaders)


def plain_name(name: str) -> str:
    """A parameter of the PEFT model as the base model names it."""
    # nested ParamWrappers (LoRA on several MoE expert parameters): experts.base_layer.base_layer.gate_up_proj
    return re.sub(r"(?:\.base_layer)+\.", ".", name.removeprefix("base_model.model.")).replace(".original_module.", ".")


def _peft(model, src: Source, base: dict[str, TensorRef]):
    """PEFT's own LoRA layers around the meta model, the saved factors loaded (they stay in memory: small)."""
    from peft import get_peft_model, set_peft_model_state_dict
    path = src.adapter.path
    config = src.adapter.peft_config()
    if (path / "adapter_config.json").is_file():
        from safetensors.torch import load_file
        state = load_file(path / "adapter_model.safetensors")
    else:  # saved whole by its trainer (verl): the factors are the adapter's updates
        state = {f"base_model.model.{u.module}{'.base_layer' * u.depth}.lora_{role}.weight": ref.load()
                 for u in src.adapter.updates for role, ref in (("A", u.a), ("B", u.b))}
    # PEFT puts the adapter's parameters on the base layer's device (here: meta). Give every parameter that is
    # not a base weight (the LoRA factors, DoRA magnitudes, modules_to_save copies) CPU storage: the saved tensor
    # itself where its name is the parameter's without the adapter name (no second copy of the factors), else
    # zeros; then PEFT loads the saved state into them (a copy onto itself for the first kind). The base weights
    # stay meta, filled module by module by attach().
    peft_model = get_peft_model(model, config)
    state = {k: v.to(torch.float32) for k, v in state.items()}
    for name, p in list(peft_model.named_parameters()):
        if p.is_meta and plain_name(name) not in base:
            owner, _, leaf = name.rpartition(".")
            saved = state.get(name.replace(".default.", "."))
            if saved is None or tuple(saved.shape) != tuple(p.shape):
                saved = torch.zeros(p.shape, dtype=torch.float32)
            peft_model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(saved, requires_grad=False)
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:  # a factor PEFT could not place would silently drop out of the reference
        raise ValueError(f"the adapter's {result.unexpected_keys[0]} has no place in PEFT's model")
    return peft_model.eval()


def export_run(folder_path, refs: dict[str, TensorRef]) -> Run:
    """The export as vLLM computes it: its own tensors, upcast to float32. A tensor the export lacks (the
    structure checks report it) computes as zeros, as transformers initialises a missing bias."""
    model = _skeleton(folder_path)
    loaders = moe.to_memory_layout(dict(refs), model.config.to_dict())
    if "lm_head.weight" not in loaders and "model.embed_tokens.weight" in loaders:
        loaders["lm_head.weight"] = loaders["model.embed_tokens.weight"]
    for name, p in model.named_parameters():
        if p.is_meta and name not in loaders:
            loaders[name] = TensorRef(name, torch.float32, tuple(p.shape), lambda s=tuple(p.shape): torch.zeros(s))
    return attach(model, loaders)


def first_divergence(ref: Run, got: Run, tol: float) -> tuple[int, float] | None:
    """(layer, relative max |Δ|) of the first decoder layer whose prompt-pass output leaves the reference."""
    for i in sorted(ref.layer_outputs):
        worst = 0.0
        for a, b in zip(ref.layer_outputs[i], got.layer_outputs.get(i, [])):  # one per prompt
            if a.shape != b.shape:
                return i, float("inf")
            worst = max(worst, float((a - b).abs().max()) / max(1.0, float(a.abs().max())))
        if worst > tol:
            return i, worst
    return None

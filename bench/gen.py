"""Random models and LoRA adapters of real geometries, written tensor by tensor (no model is ever instantiated).

Deterministic: every tensor comes from its own generator seeded with (seed, its index), so a tensor's bytes do
not depend on which others were generated; the bench's reference check regenerates nothing and reads the files.
The safetensors files are written with a minimal writer of our own (header, then bytes) so that the inputs do
not depend on the code under test.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Where generated inputs and outputs go (GBs, outside the repo): --root, else $RLEXPORT_BENCH_ROOT, else a folder in
# the system's temporary directory.
DEFAULT_ROOT = Path(os.environ.get("RLEXPORT_BENCH_ROOT") or Path(tempfile.gettempdir()) / "rlexport-bench")


def venv_python(var: str, what: str) -> str:
    """The Python of a tool's own venv (llm-compressor, verl), named by an environment variable."""
    py = os.environ.get(var)
    if not py:
        raise SystemExit(f"set {var} to the python of the venv with {what} (bench/README.md says how to make it)")
    return py

ST = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Geometry:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    shard_bytes: int  # how the published checkpoint is sharded (save_pretrained's default is 5GB)

    @property
    def eos(self) -> int:
        return min(151643, self.vocab - 1)  # Qwen2's <|endoftext|>, inside a small test vocabulary too

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self) -> dict:
        return {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
            "use_cache": True, "bos_token_id": self.eos, "eos_token_id": self.eos, "torch_dtype": "bfloat16",
            "dtype": "bfloat16", "sliding_window": None, "use_sliding_window": False, "max_window_layers": 28,
        }

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order Qwen2 checkpoints store them."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,)),
                    (p + "mlp.down_proj.weight", (h, i)), (p + "mlp.gate_proj.weight", (i, h)),
                    (p + "mlp.up_proj.weight", (i, h)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "self_attn.k_proj.bias", (kv,)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
                    (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.v_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.weight", (kv, h))]
        out.append(("model.norm.weight", (h,)))
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, h)))
        return out

    def module_shape(self, module: str) -> tuple[int, int]:
        """(out, in) of a linear module."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}[module]

    @property
    def nbytes(self) -> int:
        return sum(2 * _numel(s) for _, s in self.tensors())


GEOMETRIES = {
    # Qwen2-1.5B: 1.54B parameters, tied embeddings, one 3.09 GB file
    "1.5b": Geometry("Qwen2-1.5B", 1536, 8960, 28, 12, 2, 151936, True, 5_000_000_000),
    # Qwen2-7B: 7.6B parameters, untied, 15.2 GB in 4 shards
    "7b": Geometry("Qwen2-7B", 3584, 18944, 28, 28, 4, 152064, False, 4_000_000_000),
}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _header(items: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dtype, shape in items:
        n = _numel(shape) * dtype.itemsize
        header[name] = {"dtype": ST[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, items: list[tuple[str, torch.dtype, tuple[int, ...]]], make) -> None:
    """Write tensors in order; make(index, name, dtype, shape) returns each one (only one is alive at a time)."""
    with open(path, "wb") as f:
        f.write(_header(items))
        for k, (name, dtype, shape) in enumerate(items):
            t = make(k, name, dtype, shape).contiguous()
            assert t.dtype == dtype and tuple(t.shape) == tuple(shape), name
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _randn(seed: int, k: int, shape, std: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + k)
    t = torch.randn(shape, generator=g, dtype=torch.float32)
    return t.mul_(std).to(dtype)


def make_base(geo: Geometry, out: Path, *, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tensors = geo.tensors()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        n = 2 * _numel(shape)
        if shards[-1] and size + n > geo.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    index = {"metadata": {"total_size": geo.nbytes}, "weight_map": {}}
    base_k = 0
    for i, group in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        items = [(name, torch.bfloat16, shape) for name, shape in group]

        def make(k, name, dtype, shape, base_k=base_k):
            if name.endswith("norm.weight"):  # norms near 1, like a trained model
                return (1.0 + _randn(seed, base_k + k, shape, 0.1, torch.float32)).to(dtype)
            return _randn(seed, base_k + k, shape, 0.02, dtype)
        write_safetensors(out / fname, items, make)
        index["weight_map"].update({name: fname for name, _ in group})
        base_k += len(group)
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(geo.config(), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": geo.eos, "eos_token_id": geo.eos}))
    return out


def make_adapter(geo: Geometry, base: Path, out: Path, *, rank: int = 64, alpha: int = 128,
                 targets: tuple[str, ...] = LINEAR, seed: int = 1, dtype=torch.float32) -> Path:
    """A PEFT LoRA adapter (float32 factors, as PEFT saves them by default) on every `targets` module."""
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for n in range(geo.layers):
        for m in targets:
            block = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            mod = f"base_model.model.model.layers.{n}.{block}.{m}"
            o, i = geo.module_shape(m)
            items += [(f"{mod}.lora_A.weight", dtype, (rank, i)), (f"{mod}.lora_B.weight", dtype, (o, rank))]
    # delta = (alpha/r) * B @ A ~ 0.1 of the weights' std (0.02): a merge that is off shows up
    std_a = 0.01
    std_b = 0.1 * 0.02 / ((alpha / rank) * rank ** 0.5 * std_a)

    def make(k, name, dtype, shape):
        return _randn(seed, k, shape, std_a if ".lora_A." in name else std_b, dtype)
    write_safetensors(out / "adapter_model.safetensors", items, make)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": rank,
           "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none",
           "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
           "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def ensure_inputs(geo_key: str, root: Path, *, rank: int, targets: tuple[str, ...], seed: int = 0,
                  adapter_dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    geo = GEOMETRIES[geo_key]
    base = root / f"base-{geo_key}"
    adapter = root / f"lora-{geo_key}-r{rank}-{'-'.join(t.removesuffix('_proj') for t in targets)}"
    if adapter_dtype != torch.float32:
        adapter = adapter.with_name(adapter.name + "-" + str(adapter_dtype).removeprefix("torch."))
    stamp = base / ".complete"
    if not stamp.exists():
        t = time.time()
        make_base(geo, base, seed=seed)
        stamp.write_text("ok")
        print(f"generated {base} ({geo.nbytes / 1e9:.2f} GB) in {time.time() - t:.0f}s", flush=True)
    astamp = adapter / ".complete"
    if not astamp.exists():
        make_adapter(geo, base, adapter, rank=rank, targets=targets, seed=seed + 1, dtype=adapter_dtype)
        astamp.write_text("ok")
    return base, adapter

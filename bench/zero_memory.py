"""Peak RSS of `rlexport export` on a DeepSpeed ZeRO-3 checkpoint as the model grows.

Builds synthetic ZeRO-3 checkpoints (world size 2, Qwen2-shaped, growing layer count) by writing the same pickled
structure DeepSpeed 0.16.9 writes (`zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt`, `[0]` placeholders in
`module`, `param_shapes` in two groups, `fp32_flat_groups` in sub-groups, `ZeroStageEnum`/`LossScaler` pickled
under DeepSpeed's names) with torch.save; exports each in a fresh subprocess that reports its own peak RSS
(the kernel's VmHWM, reset after the imports) and its RSS after imports; for contrast, a subprocess that just
torch.load()s every rank's partitions (what a reader that materialises them does). Writes bench/ZERO_MEMORY.md.

Usage: python bench/zero_memory.py [--layers 2 8 24 48] [--hidden 1024] [--work DIR] [--keep]
DeepSpeed is not needed (nor imported).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections import OrderedDict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORLD = 2


def _fake_deepspeed_classes():
    """rlexport's stand-ins (formats/pickles.py), registered under DeepSpeed's module paths in this process only,
    so that torch.save pickles them as DeepSpeed would."""
    from rlexport.formats.pickles import SAFE_GLOBALS, LossScaler, ZeroStageEnum
    for cls, path in SAFE_GLOBALS:
        mod, name = path.rsplit(".", 1)
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):  # pickle imports the module path: every parent must exist
            sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        setattr(sys.modules[mod], name, cls)
        cls.__module__, cls.__qualname__ = mod, name
    return ZeroStageEnum, LossScaler


def qwen2_shapes(layers: int, hidden: int) -> tuple[OrderedDict, dict]:
    inter, vocab, heads, kv = int(hidden * 2.75) // 64 * 64, 32000, hidden // 64, max(1, hidden // 512)
    hd = hidden // heads
    shapes = OrderedDict([("model.embed_tokens.weight", (vocab, hidden))])
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update([(p + "self_attn.q_proj.weight", (heads * hd, hidden)),
                       (p + "self_attn.q_proj.bias", (heads * hd,)),
                       (p + "self_attn.k_proj.weight", (kv * hd, hidden)), (p + "self_attn.k_proj.bias", (kv * hd,)),
                       (p + "self_attn.v_proj.weight", (kv * hd, hidden)), (p + "self_attn.v_proj.bias", (kv * hd,)),
                       (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
                       (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                       (p + "mlp.down_proj.weight", (hidden, inter)),
                       (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))])
    shapes.update([("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))])
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
              "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
              "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "hidden_act": "silu"}
    return shapes, config


def build(ckpt: Path, layers: int, hidden: int) -> int:
    """A ZeRO-3 checkpoint folder (config.json, latest, global_step1/); returns the parameter count."""
    ZeroStageEnum, LossScaler = _fake_deepspeed_classes()
    shapes, config = qwen2_shapes(layers, hidden)
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    (ckpt / "latest").write_text("global_step1")
    tag = ckpt / "global_step1"
    tag.mkdir()
    groups = [OrderedDict((k, torch.Size(s)) for k, s in shapes.items() if len(s) > 1),
              OrderedDict((k, torch.Size(s)) for k, s in shapes.items() if len(s) == 1)]
    per_rank = sum(math.ceil(math.prod(s) / WORLD) for g in groups for s in g.values())
    gen = torch.Generator().manual_seed(0)
    for r in range(WORLD):
        module = OrderedDict((k, torch.empty(0)) for k in shapes)
        torch.save({"module": module, "buffer_names": [], "optimizer": None, "param_shapes": groups,
                    "frozen_param_shapes": OrderedDict(), "frozen_param_fragments": OrderedDict(),
                    "shared_params": {}, "lr_scheduler": None, "sparse_tensor_module_names": set(),
                    "skipped_steps": 0, "global_steps": 1, "global_samples": 8, "dp_world_size": WORLD,
                    "mp_world_size": 1, "ds_config": {"zero_optimization": {"stage": 3}}, "ds_version": "0.16.9"},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        flat = torch.empty(per_rank)
        flat.normal_(0, 0.02, generator=gen)
        cut = per_rank // 3  # two optimizer sub-groups, the boundary inside some parameter
        parts = [flat[:cut].clone(), flat[cut:].clone()]
        del flat
        scaler = LossScaler()
        scaler.cur_scale, scaler.dynamic = 1.0, False  # the attributes DeepSpeed's static scaler pickles
        torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.weights, "loss_scaler": scaler,
                                             "dynamic_loss_scale": False, "overflow": False,
                                             "partition_count": WORLD,
                                             "optimizer_state_dict": {"state": {}, "param_groups": []},
                                             "fp32_flat_groups": parts},
                    "ds_config": {}, "ds_version": "0.16.9"},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        del parts
    return sum(math.prod(s) for s in shapes.values())


# Peak RSS is the kernel's VmHWM, reset after the imports (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) so a
# transient peak while importing torch does not hide the export's own; getrusage's ru_maxrss is reported too.
MEM = r"""
import resource
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
"""

CHILD_EXPORT = MEM + r"""
import sys, time, json
import torch, rlexport
reset_peak()
base = status("VmRSS")
t = time.time()
r = rlexport.export(sys.argv[1], sys.argv[2])
dt = time.time() - t
print(json.dumps({"peak_kb": status("VmHWM"), "import_kb": base, "ru_maxrss_kb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss, "seconds": dt, "bytes": r.bytes, "dtype": r.dtype, "tensors": r.tensors}))
"""

CHILD_NAIVE = MEM + r"""
import sys, glob, json
import torch
from rlexport.formats.pickles import SAFE_GLOBALS
reset_peak()
base = status("VmRSS")
with torch.serialization.safe_globals(SAFE_GLOBALS):
    sds = [torch.load(f, map_location="cpu", weights_only=True)["optimizer_state_dict"]["fp32_flat_groups"]
           for f in sorted(glob.glob(sys.argv[1] + "/global_step1/*_optim_states.pt"))]
print(json.dumps({"peak_kb": status("VmHWM"), "import_kb": base}))
"""


def child(code: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(ckpt: Path, out: Path) -> None:
    """Spot-check the export against the partitions: the last layer's down_proj, rebuilt by hand."""
    from safetensors import safe_open
    from rlexport.formats.deepspeed.zero import read_zero
    z = read_zero(ckpt / "global_step1")
    name = [r.name for r in z.refs if r.name.endswith("mlp.down_proj.weight")][-1]
    want = next(r for r in z.refs if r.name == name).load().to(torch.bfloat16)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(out / index["weight_map"][name], "pt") as f:
        assert torch.equal(f.get_tensor(name), want), name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 24, 48])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--naive-max-gb", type=float, default=4.0, help="skip the torch.load contrast above this")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="zero-mem-"))
    rows = []
    for layers in a.layers:
        ckpt, out = work / f"z3-L{layers}", work / f"out-L{layers}"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        t = time.time()
        n = build(ckpt, layers, a.hidden)
        built = time.time() - t
        disk = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        res = child(CHILD_EXPORT, ckpt, out)
        check(ckpt, out)
        naive = child(CHILD_NAIVE, ckpt) if disk / 1e9 <= a.naive_max_gb else None
        row = {"layers": layers, "params": n, "ckpt_bytes": disk, "out_bytes": res["bytes"],
               "import_mb": res["import_kb"] / 1024, "peak_mb": res["peak_kb"] / 1024,
               "export_growth_mb": (res["peak_kb"] - res["import_kb"]) / 1024, "seconds": res["seconds"],
               "build_seconds": built, "naive_peak_mb": naive and naive["peak_kb"] / 1024}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not a.keep:
            shutil.rmtree(ckpt)
            shutil.rmtree(out)
    write_md(rows, a)


def write_md(rows, a) -> None:
    lines = [
        "# Peak RSS of a ZeRO-3 export as the model grows",
        "",
        f"`python bench/zero_memory.py --layers {' '.join(map(str, a.layers))} --hidden {a.hidden}`: synthetic "
        f"ZeRO-3 checkpoints (world size {WORLD}, Qwen2-shaped, hidden {a.hidden}, vocab 32000, fp32 master "
        "partitions in two optimizer sub-groups, written with torch.save in DeepSpeed 0.16.9's pickled "
        "structure), each exported (`rlexport.export`, default dtype: the config's bfloat16) in a fresh "
        "subprocess that reports its own peak RSS: the kernel's VmHWM, reset once torch and rlexport are imported "
        "(`/proc/self/clear_refs`), so it is the peak during the export itself. \"RSS after imports\" is VmRSS at "
        "that point; \"growth\" is peak minus it. The last column is the same measurement for a subprocess that "
        "only `torch.load`s every rank's fp32 partitions, as a reader that materialises them must.",
        "",
        "| layers | params | checkpoint on disk | export written (bf16) | RSS after imports | peak RSS | "
        "growth during export | export time | torch.load of the partitions: peak RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        naive = f"{r['naive_peak_mb']:.0f} MB" if r["naive_peak_mb"] else "skipped"
        lines.append(f"| {r['layers']} | {r['params'] / 1e6:.0f} M | {r['ckpt_bytes'] / 1e9:.2f} GB | "
                     f"{r['out_bytes'] / 1e9:.2f} GB | {r['import_mb']:.0f} MB | {r['peak_mb']:.0f} MB | "
                     f"{r['export_growth_mb']:.0f} MB | {r['seconds']:.1f} s | {naive} |")
    lines += [
        "",
        "How it stays bounded: the `.pt` files are unpickled on the `meta` device (only the pickle is read; each "
        "tensor keeps its byte offset in the zip, checked against the zip's record table), and each parameter's "
        "load `pread`s just its own slices from every rank's partition, in row blocks the writer streams "
        "(rlexport.formats.deepspeed.zero.Segments). No mmap: mapped pages would count as resident memory.",
        "",
        f"Machine: {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} CPU cores; "
        f"torch {torch.__version__}; Python {sys.version.split()[0]}. Export correctness is spot-checked each run "
        "(the last layer's down_proj equals the partitions' bf16 cast); the real-fixture tests "
        "(tests/test_deepspeed.py) check every tensor against DeepSpeed's zero_to_fp32.",
        "",
    ]
    (HERE / "ZERO_MEMORY.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()

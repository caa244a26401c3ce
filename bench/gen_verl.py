"""A verl FSDP2 actor checkpoint (world size 2, rank files of DTensors Shard(0)) of a bench geometry, no training.

    .venv/bin/python bench/gen_verl.py --geometry 1.5b [--root DIR]

Writes ROOT/verl-<geometry>/ the way verl 0.9.1's FSDPCheckpointManager lays out a run (see
src/rlexport/formats/verl.py and tests/test_verl.py's flat-memory builder, which this follows):
`latest_checkpointed_iteration.txt` ("1") and `global_step_1/actor/` with `fsdp_config.json`
({"FSDP_version": 2, "world_size": 2}), `huggingface/` (the geometry's config.json and generation_config.json, and
the tokenizer files of the verl test fixture so that verl's merger finds a tokenizer), and
`model_world_size_2_rank_{0,1}.pt`: torch.save of a dict name -> DTensor placed Shard(0), its local tensor the
rank's torch.chunk(t, 2) of bench/gen.py's bf16 base tensor. No optimizer or extra-state files (neither rlexport
nor verl's merger reads them). A DTensor needs a device mesh: it is taken from the fixture's own rank file
(a CPU mesh of ranks [0, 1] saved by verl), so no process group is started.
Tensors are read one at a time from the base (safetensors); each rank's dict holds half the model while it is
written. The base comes from bench/gen.py (generated if missing).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed.tensor  # noqa: F401 - registers DTensor for weights_only loads
from safetensors import safe_open
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gen import DEFAULT_ROOT, LINEAR, ensure_inputs  # noqa: E402

FIXTURE_ACTOR = HERE.parent / "tests/fixtures/verl_fsdp2_actor_qwen2/ckpt/global_step_4/actor"


def make_verl(base: Path, run: Path, world_size: int = 2) -> Path:
    actor = run / "global_step_1" / "actor"
    if (run / ".complete").exists():
        return run
    shutil.rmtree(run, ignore_errors=True)
    (actor / "huggingface").mkdir(parents=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(base / name, actor / "huggingface" / name)
    for f in (FIXTURE_ACTOR / "huggingface").iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, actor / "huggingface" / f.name)
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world_size}, indent=4))
    (run / "latest_checkpointed_iteration.txt").write_text("1")
    mesh = next(iter(torch.load(FIXTURE_ACTOR / "model_world_size_2_rank_0.pt", weights_only=True).values())).device_mesh
    assert mesh.size() == world_size, mesh
    files = sorted(base.glob("*.safetensors"))
    for rank in range(world_size):
        sd = {}
        for f in files:
            with safe_open(f, "pt") as h:
                for name in h.keys():
                    t = h.get_tensor(name)
                    spec = DTensorSpec(mesh, (Shard(0),), TensorMeta(t.shape, t.stride(), t.dtype))
                    sd[name] = DTensor(torch.chunk(t, world_size)[rank].clone(), spec, requires_grad=False)
                    del t
        torch.save(sd, actor / f"model_world_size_{world_size}_rank_{rank}.pt")
        del sd
    (run / ".complete").write_text("ok")
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="1.5b")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    args = ap.parse_args()
    base, _ = ensure_inputs(args.geometry, args.root, rank=64, targets=LINEAR)
    t = time.time()
    run = make_verl(base, args.root / f"verl-{args.geometry}")
    print(f"{run} in {time.time() - t:.0f}s")


if __name__ == "__main__":
    main()

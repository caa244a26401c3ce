"""Demo: a LLaMA-Factory PPO LoRA checkpoint (shipped in tests/fixtures) fails in vLLM; its export serves.

Run after scripts/setup.sh:  .venv/bin/python scripts/demo.py
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASE = ROOT / "tests" / "fixtures" / "lf_ppo_full_qwen2"
OUT = ROOT / "demo-out"


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main() -> None:
    from rlexport.engines.vllm import run_jobs
    rl = str(Path(sys.executable).parent / "rlexport")
    shutil.rmtree(OUT, ignore_errors=True)
    sh(rl, "inspect", str(CASE / "ckpt"))
    sh(rl, "export", str(CASE / "ckpt"), "--out", str(OUT / "policy"))
    sh(rl, "export", str(CASE / "ckpt"), "--out", str(OUT / "policy-fp32"), "--dtype", "float32", "--quiet")
    prompts = json.loads((CASE / "expected.json").read_text())["prompts"][:2]
    print("\nStarting vLLM (CPU) on the raw checkpoint, then on the exports ...", flush=True)
    models = {"raw checkpoint": CASE / "ckpt", "export (bfloat16)": OUT / "policy",
              "export (float32)": OUT / "policy-fp32"}
    results = run_jobs([{"model": str(m), "prompts": prompts, "dtype": "float32" if "32" in k or "raw" in k
                         else "bfloat16"} for k, m in models.items()])
    expected = json.loads((CASE / "expected.json").read_text())["policy"]["greedy"][:2]
    for (name, _), r in zip(models.items(), results):
        if r["ok"]:
            same = "equal to" if r["greedy"] == expected else "different from"
            print(f"  {name}: vLLM generated {r['greedy'][0]} ... ({same} the training-time model's greedy tokens)")
        else:
            print(f"  {name}: vLLM failed: {r['error'][:160]}")
    ok = not results[0]["ok"] and results[1]["ok"] and results[2]["ok"] and results[2]["greedy"] == expected
    print("\ndemo", "OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

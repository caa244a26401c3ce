"""Peak RSS of a vLLM CPU engine start through the rlexport plugin vs from the exported folder (issue 16), same run.

    .venv/bin/python bench/plugin_memory.py --geometry 1.5b --nice -15 --repeat 3

Input: an LLaMA-Factory-PPO-style LoRA folder (bench/gen.py: rank 16, alpha 32, float32 factors on all 7 linears
of the geometry's bf16 base; tokenizer files and chat template of tests/fixtures/lf_ppo_lora_qwen2/ckpt beside
it; adapter_config.json names the base by path), made once under --root. The exported folder is
`rlexport export CKPT --out EXPORTED` (bf16), made once before the timed runs. Each round starts
bench/serve_once.py once per mode (plugin, then folder), one process each (VLLM_ENABLE_V1_MULTIPROCESSING=0,
VLLM_CPU_KVCACHE_SPACE=1 GiB), timed by bench/run.py's timed(): wall time and ru_maxrss of the process (file pages
mapped included); serve_once.py also samples its own RssAnon / RssFile. Results: bench/plugin-memory-<geometry>.json
and the section bench/RESULTS.d/40-plugin-memory-<geometry>.md of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as harness  # noqa: E402
from gen import DEFAULT_ROOT, GEOMETRIES, LINEAR, ensure_inputs, make_adapter  # noqa: E402

LF = HERE.parent / "tests/fixtures/lf_ppo_lora_qwen2/ckpt"


def make_ckpt(geometry: str, root: Path) -> tuple[Path, Path]:
    base, _ = ensure_inputs(geometry, root, rank=64, targets=LINEAR)
    ckpt = root / f"lf-ppo-lora-{geometry}-r16"
    if not (ckpt / ".complete").exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        make_adapter(GEOMETRIES[geometry], base, ckpt, rank=16, alpha=32, targets=LINEAR, seed=7)
        for f in LF.iterdir():
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, ckpt / f.name)
        (ckpt / ".complete").write_text("ok")
    exported = root / f"lf-ppo-lora-{geometry}-r16-exported"
    if not (exported / "config.json").exists():
        shutil.rmtree(exported, ignore_errors=True)
        subprocess.run([harness.RLEXPORT, "export", str(ckpt), "--out", str(exported), "--quiet"], check=True)
    return ckpt, exported


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="1.5b")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nice", type=int, default=0)
    args = ap.parse_args()
    harness.NICE = args.nice
    ckpt, exported = make_ckpt(args.geometry, args.root)
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    logs = args.root / f"logs-plugin-{args.geometry}"
    logs.mkdir(exist_ok=True)
    dev = harness.disk_of(args.root)
    res = {"geometry": args.geometry, "model": GEOMETRIES[args.geometry].name, "machine": harness.machine(),
           "nice": args.nice, "ckpt_bytes": harness.output_bytes(ckpt),
           "exported_bytes": harness.output_bytes(exported), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "runs": {}}
    for rnd in range(args.repeat):
        for mode, path in (("plugin", ckpt), ("folder", exported)):
            harness.warm_up([path] + ([args.root / f"base-{args.geometry}"] if mode == "plugin" else []))
            log = logs / f"{mode}-{rnd}.log"
            r = harness.timed([harness.PY, str(HERE / "serve_once.py"), mode, str(path)], dev, log)
            if r["rc"] == 0:
                try:
                    r.update(json.loads([ln for ln in log.read_text().splitlines() if ln.startswith('{"phases"')][-1]))
                except (IndexError, ValueError):
                    pass
            print(f"round {rnd} {mode}: {r['seconds']:.1f}s peak {r['peak_rss'] / 2**30:.2f} GiB rc={r['rc']} "
                  f"sampled {r.get('peak_sampled')} greedy {r.get('greedy')}", flush=True)
            res["runs"].setdefault(mode, []).append(r)
            (HERE / f"plugin-memory-{args.geometry}.json").write_text(json.dumps(res, indent=2))
    render(args.geometry)


def render(geometry: str) -> None:
    res = json.loads((HERE / f"plugin-memory-{geometry}.json").read_text())
    m, runs = res["machine"], res["runs"]
    gib = 2**30
    lines = [f"## vLLM start through the plugin vs from the exported folder (issue 16): {res['model']} geometry, "
             f"bf16 base + rank-16 float32 LoRA on all 7 linears (LLaMA-Factory PPO-style adapter folder, "
             f"{res['ckpt_bytes'] / 1e6:.0f} MB; exported folder {res['exported_bytes'] / 1e9:.2f} GB)", "",
             f"`bench/plugin_memory.py` (run {res['started']}): `bench/serve_once.py` starts vLLM 0.32 (CPU) in one "
             "process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `VLLM_CPU_KVCACHE_SPACE=1`), `dtype=\"bfloat16\", "
             "enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.1`, either `LLM(**rlexport.vllm_args("
             "CKPT), ...)` (plugin) or `LLM(model=EXPORTED, ...)` (folder), then generates 8 greedy tokens. Inputs "
             "read once before each start (warm). Machine: "
             f"{m['cpus']} CPUs, {m['ram_gib']} GiB RAM, torch {m['torch']}; **shared with another engineer's work "
             f"during the run**; processes in their own session at nice {res['nice']}. Peak RSS: ru_maxrss of the "
             "process (anonymous + file-backed pages); RssAnon / RssFile: peaks sampled every 50 ms by the process.",
             "", "| start | wall (s) | runs (s) | peak RSS (GiB) | runs (GiB) | peak RssAnon (GiB) | peak RssFile (GiB) "
             "| engine start (s) | greedy tokens |", "|---|---:|---|---:|---|---:|---:|---:|---|"]
    for mode, label in (("plugin", "plugin: `LLM(**rlexport.vllm_args(CKPT))`"),
                        ("folder", "exported folder: `LLM(model=EXPORTED)`")):
        ok = [r for r in runs.get(mode, []) if r["rc"] == 0]
        if not ok:
            lines.append(f"| {label} | failed | | | | | | | |")
            continue
        lines.append(
            f"| {label} | {statistics.median(r['seconds'] for r in ok):.1f} | "
            f"{', '.join('%.1f' % r['seconds'] for r in ok)} | "
            f"{statistics.median(r['peak_rss'] for r in ok) / gib:.2f} | "
            f"{', '.join('%.2f' % (r['peak_rss'] / gib) for r in ok)} | "
            f"{statistics.median(r.get('peak_sampled', {}).get('RssAnon', 0) for r in ok) / gib:.2f} | "
            f"{statistics.median(r.get('peak_sampled', {}).get('RssFile', 0) for r in ok) / gib:.2f} | "
            f"{statistics.median(r.get('phases', {}).get('engine start', 0) for r in ok):.1f} | "
            f"{ok[0].get('greedy')} |")
    lines.append("")
    harness.write_section(f"40-plugin-memory-{geometry}", lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:
        render(sys.argv[2] if len(sys.argv) > 2 else "1.5b")
    else:
        main()

"""`rlexport serve --follow`: time and memory of a weight swap in the running server vs an engine (re)start.

    .venv/bin/python bench/serve_swap.py --geometry 1.5b --swaps 3 [--root DIR]

Input: bench/gen_verl.py's verl FSDP2 run of the geometry (bf16 rank files, world size 2). A run folder under
ROOT/follow-<geometry>/ gets global_step_1 (hard links to those files), then, one at a time, global_step_2, 3, ...
(hard links again: the swap reads and loads every tensor whatever their values) with the tracker file naming it.
`rlexport serve RUN --follow` (the venv's bin/rlexport, vLLM CPU, bf16, VLLM_CPU_KVCACHE_SPACE=1 GiB,
max_model_len 256, eager) is started once; a sampler reads the RSS of every process under it every 50 ms.

- start (= a restart's cost, the old engine being stopped first): spawn until the server is ready (the
  supervisor's "ready in" figure) and the peak RSS of the engine worker (the process holding the weights) and of
  the whole process tree during that window.
- swap: the supervisor's "done in" figure (pause, update_config, reload_weights, prefix-cache reset; resume), the
  time from the tracker write to `/rlexport/checkpoint` naming the step (poll interval, settling poll and the
  step's plan included), and the same peaks during that window.
Results: bench/serve-swap-<geometry>.json and bench/RESULTS.d/60-serve-swap-<geometry>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as harness  # noqa: E402
from gen import DEFAULT_ROOT, LINEAR, ensure_inputs  # noqa: E402
from gen_verl import make_verl  # noqa: E402

GIB = 1024 ** 3


class Sampler(threading.Thread):
    """Peak RSS of the worker process and of the whole tree under `pid`, per named window."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root, self.window, self.peaks, self.stop = psutil.Process(pid), None, {}, False

    def run(self):
        while not self.stop:
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                rss = {p.pid: (p.name(), p.memory_info().rss) for p in procs}
            except psutil.Error:
                time.sleep(0.05)
                continue
            w = self.window
            if w is not None:
                worker = max((r for n, r in rss.values() if "Worker" in n or "EngineCore" in n), default=0)
                tree = sum(r for _, r in rss.values())
                pk = self.peaks.setdefault(w, {"worker": 0, "tree": 0, "worker_first": worker})
                pk["worker"], pk["tree"] = max(pk["worker"], worker), max(pk["tree"], tree)
                pk["worker_last"] = worker  # the window ends 1 s after the swap: what the engine keeps
            time.sleep(0.05)


def link_step(src: Path, dst: Path) -> None:
    for root, _, files in os.walk(src):
        out = dst / Path(root).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            os.link(os.path.join(root, f), out / f)


def state(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/rlexport/checkpoint", timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="1.5b")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--swaps", type=int, default=3)
    args = ap.parse_args()
    base, _ = ensure_inputs(args.geometry, args.root, rank=64, targets=LINEAR)
    verl = make_verl(base, args.root / f"verl-{args.geometry}") / "global_step_1"
    run = args.root / f"follow-{args.geometry}"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    link_step(verl, run / "global_step_1")
    (run / "latest_checkpointed_iteration.txt").write_text("1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = args.root / f"follow-{args.geometry}.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [harness.RLEXPORT, "serve", str(run), "--follow", "--poll", "0.5", "--port", str(port), "--",
           "--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "8"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    sampler = Sampler(proc.pid)
    sampler.window = "start"
    sampler.start()
    swaps = []
    try:
        while state(port).get("tag") != "global_step_1":
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        for k in range(2, args.swaps + 2):
            time.sleep(2)
            sampler.window = f"swap{k}"
            link_step(verl, run / f"global_step_{k}")
            t0 = time.monotonic()
            (run / "latest_checkpointed_iteration.txt").write_text(str(k))
            while state(port).get("tag") != f"global_step_{k}":
                assert proc.poll() is None and time.monotonic() - t0 < 600, log.read_text()[-2000:]
                time.sleep(0.05)
            seen = time.monotonic() - t0
            time.sleep(1)
            sampler.window = None
            swaps.append({"step": k, "seen_s": seen})
    finally:
        sampler.stop = True
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    text = log.read_text()
    ready = float(re.search(r"ready in ([\d.]+) s", text).group(1))
    done = [float(x) for x in re.findall(r"swap global_step_\d+ -> global_step_\d+: done in ([\d.]+) s", text)]
    for s, d in zip(swaps, done):
        s["swap_s"] = d
        s.update({f"peak_{k}": v for k, v in sampler.peaks.get(f"swap{s['step']}", {}).items()})
    res = {"geometry": args.geometry, "ready_s": ready, "start_peaks": sampler.peaks.get("start"), "swaps": swaps,
           "restarts": len(re.findall(r"restarting the engine", text)), "load": os.getloadavg(),
           "machine": {"cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / GIB, 1)}}
    (HERE / f"serve-swap-{args.geometry}.json").write_text(json.dumps(res, indent=1))
    render(args.geometry)


def render(geometry: str) -> None:
    res = json.loads((HERE / f"serve-swap-{geometry}.json").read_text())
    sw, st = res["swaps"], res["start_peaks"] or {}
    med = lambda key: statistics.median(s[key] for s in sw)  # noqa: E731
    lines = [f"## serve --follow: swap in place vs engine start (issue 26), {geometry} geometry, verl FSDP2 bf16",
             "", f"`bench/serve_swap.py --geometry {geometry} --swaps {len(sw)}`: one `rlexport serve RUN --follow` "
             "(vLLM 0.32 CPU, bf16, 1 GiB KV cache, eager), then each new step's tracker write; RSS sampled every "
             f"50 ms over the server's process tree. Machine: {res['machine']['cpus']} CPUs, "
             f"{res['machine']['ram_gib']} GiB, shared (load average {res['load'][0]:.1f} at the end). "
             f"Engine restarts during the swaps: {res['restarts']}.", "",
             "| event | time (s) | runs (s) | peak RSS, engine process (GiB) | peak RSS, process tree (GiB) | "
             "engine RSS before -> 1 s after, per swap (GiB) |",
             "|---|---:|---|---:|---:|---|",
             f"| start (a restart's cost): spawn to ready | {res['ready_s']:.1f} | {res['ready_s']:.1f} | "
             f"{st.get('worker', 0) / GIB:.2f} | {st.get('tree', 0) / GIB:.2f} | |",
             f"| swap: pause, reload on every worker, prefix-cache reset (supervisor's figure) | {med('swap_s'):.2f} | "
             f"{', '.join('%.2f' % s['swap_s'] for s in sw)} | {med('peak_worker') / GIB:.2f} | "
             f"{med('peak_tree') / GIB:.2f} | "
             + ", ".join(f"{s.get('peak_worker_first', 0) / GIB:.2f} -> {s.get('peak_worker_last', 0) / GIB:.2f}"
                         for s in sw) + " |",
             f"| swap seen by clients: tracker written to `/rlexport/checkpoint` naming the step (0.5 s polls) | "
             f"{med('seen_s'):.2f} | {', '.join('%.2f' % s['seen_s'] for s in sw)} | | | |", ""]
    harness.write_section(f"60-serve-swap-{geometry}", lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:
        render(sys.argv[2] if len(sys.argv) > 2 else "1.5b")
    else:
        main()

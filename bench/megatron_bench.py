"""Megatron-LM torch_dist checkpoint export (issue 23): `rlexport export` of a Megatron-LM save root (TP=2 x PP=2,
bf16, distributed optimizer state inside) against slime's converter, same run.

    .venv/bin/python bench/gen_megatron_lm.py --geometry 1.5b          # the checkpoint (once)
    SLIME_PYTHON=$VENV/bin/python SLIME_DIR=$SLIME \\
    .venv/bin/python bench/megatron_bench.py --geometry 1.5b --nice -15 --repeat 3 --slime-repeat 2
    .venv/bin/python bench/megatron_bench.py --geometry 7b --methods rlexport --nice -15 --repeat 2

Methods, in turn, round after round (timing and peak RSS from bench/run.py's timed(): lean launcher, wait4
ru_maxrss of the command alone; warm = every byte range the two tools read (the weights' chunks, the byte
entries, .metadata, common.pt) read once before each run; the optimizer's ranges are holes neither reads):
  * rlexport: `rlexport export CKPT --base BASE --out OUT --quiet` (CKPT: the save root with the tracker file)
  * slime: `python tools/convert_torch_dist_to_hf.py --input-dir CKPT/iter_0000010 --output-dir OUT
    --origin-hf-dir BASE --vocab-size V && sync` (slime's own script; `$SLIME_DIR` a slime source tree,
    `$SLIME_PYTHON` the python of a venv with megatron-core 0.16.1 and transformers, as
    tests/fixtures/make/megatron/README.md makes it). It loads the whole model (torch DCP's `_load_state_dict`),
    converts, and writes bf16 safetensors.
The first warm outputs of rlexport and slime are compared tensor by tensor. Results:
bench/megatron-lm-<geometry>.json and the section bench/RESULTS.d/60-megatron-lm-<geometry>.md of RESULTS.md.
A checkpoint made with `gen_megatron_lm.py --zero-weights` gets `<geometry>-zero` in those names.
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
sys.path.insert(0, str(HERE.parent / "src"))

import run as harness  # noqa: E402
from gen import DEFAULT_ROOT, GEOMETRIES, venv_python  # noqa: E402
from gen_megatron_lm import ITERATION, disk_use, padded_vocab  # noqa: E402
from quant import compare  # noqa: E402

LABELS = {"rlexport": "`rlexport export` (save root, `--base`)",
          "slime": "slime's `tools/convert_torch_dist_to_hf.py` + `sync`"}


def command(method: str, folder: Path, out: Path, vocab: int) -> list[str]:
    ckpt, base = folder / "ckpt", folder / "base"
    if method == "rlexport":
        return [harness.RLEXPORT, "export", str(ckpt), "--base", str(base), "--out", str(out), "--quiet"]
    if method == "slime":
        py = venv_python("SLIME_PYTHON", "megatron-core 0.16.1 (slime's converter)")
        slime = os.environ.get("SLIME_DIR") or sys.exit("set SLIME_DIR to a slime source tree")
        return ["sh", "-c", f"PYTHONPATH='{slime}' '{py}' '{slime}/tools/convert_torch_dist_to_hf.py' --input-dir "
                            f"'{ckpt}/iter_{ITERATION:07d}' --output-dir '{out}' --origin-hf-dir '{base}' "
                            f"--vocab-size {vocab} && sync"]
    raise ValueError(method)


def warm(folder: Path) -> None:
    """Read the byte ranges the tools read (not the optimizer's holes: reading them would fill the page cache)."""
    from rlexport.formats.dcp import load_metadata
    it = folder / "ckpt" / f"iter_{ITERATION:07d}"
    md = load_metadata(it / ".metadata")
    for p in (it / "common.pt", folder / "base"):
        harness.warm_up([p]) if p.is_dir() else p.read_bytes()
    fds: dict = {}
    for idx, info in md.storage_data.items():
        if idx.fqn.startswith("optimizer.") and idx.offset is not None:
            continue
        fd = fds.get(info.relative_path) or fds.setdefault(info.relative_path, os.open(it / info.relative_path,
                                                                                       os.O_RDONLY))
        done = 0
        while done < info.length:
            done += len(os.pread(fd, min(64 << 20, info.length - done), info.offset + done)) or info.length
    for fd in fds.values():
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="1.5b")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--methods", default="rlexport,slime")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slime-repeat", type=int, default=2)
    ap.add_argument("--nice", type=int, default=0)
    args = ap.parse_args()
    harness.NICE = args.nice
    g = GEOMETRIES[args.geometry]
    folder = args.root / f"megatron-lm-{args.geometry}"
    if not (folder / ".complete").exists():
        sys.exit(f"no checkpoint at {folder}: run bench/gen_megatron_lm.py --geometry {args.geometry} first")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    zero = (folder / ".zero-weights").exists()
    name = args.geometry + ("-zero" if zero else "")  # results of a --zero-weights checkpoint kept apart
    dev = harness.disk_of(args.root)
    logs = args.root / f"logs-megatron-lm-{args.geometry}"
    logs.mkdir(exist_ok=True)
    apparent, allocated = disk_use(folder / "ckpt")
    res = {"geometry": args.geometry, "model": g.name, "machine": harness.machine(), "nice": args.nice,
           "input_bytes": apparent, "input_allocated": allocated, "weights_bytes": g.nbytes,
           "vocab": g.vocab, "padded_vocab": padded_vocab(g), "tied": g.tied,
           "zero_weights": zero,
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}, "checks": {}}
    out = args.root / "out-megatron-lm"
    out.mkdir(exist_ok=True)
    kept: dict[str, Path] = {}
    for rnd in range(max(args.repeat, args.slime_repeat)):
        for method in methods:
            if rnd >= (args.slime_repeat if method == "slime" else args.repeat):
                continue
            target = out / method
            shutil.rmtree(target, ignore_errors=True)
            os.sync()
            warm(folder)
            r = harness.timed(command(method, folder, target, g.vocab), dev, logs / f"{method}-warm-{rnd}.log")
            r["output_bytes"] = harness.output_bytes(target)
            print(f"round {rnd} {method}: {r['seconds']:.2f}s peak {r['peak_rss'] / 2**30:.2f} GiB rc={r['rc']} "
                  f"load {r['load_before']:.1f}", flush=True)
            res["runs"].setdefault(f"{method}-warm", []).append(r)
            if "slime" in methods and method not in kept and r["rc"] == 0:
                kept[method] = out / f"kept-{method}"
                shutil.rmtree(kept[method], ignore_errors=True)
                target.rename(kept[method])
            else:
                shutil.rmtree(target, ignore_errors=True)
            (HERE / f"megatron-lm-{name}.json").write_text(json.dumps(res, indent=2))
    if len(kept) == 2:
        res["checks"]["rlexport_vs_slime"] = compare(kept["rlexport"], kept["slime"])
        print(res["checks"], flush=True)
    for p in kept.values():
        shutil.rmtree(p, ignore_errors=True)
    (HERE / f"megatron-lm-{name}.json").write_text(json.dumps(res, indent=2))
    render(name)


def render(geometry: str) -> None:
    res = json.loads((HERE / f"megatron-lm-{geometry}.json").read_text())
    m, runs = res["machine"], res["runs"]
    med = lambda rs: statistics.median(r["seconds"] for r in rs if r["rc"] == 0)  # noqa: E731
    lines = [f"## Megatron-LM torch_dist checkpoint (issue 23): {res['model']} geometry, TP=2 x PP=2, bf16, "
             f"distributed optimizer ({res['input_bytes'] / 1e9:.1f} GB of files: {res['weights_bytes'] / 1e9:.2f} GB "
             f"of weights, the rest the fp32 optimizer state as sparse holes; {res['input_allocated'] / 1e9:.2f} GB "
             "on disk" + ("; **weights all zero, their bytes holes too** (`--zero-weights`, see the reading "
                          "below)" if res.get("zero_weights") else "") + ")", "",
             f"`bench/gen_megatron_lm.py` + `bench/megatron_bench.py` (run {res['started']}). Vocabulary "
             f"{res['vocab']} padded to {res['padded_vocab']} rows; {'tied' if res['tied'] else 'untied'} "
             f"embeddings. Machine: {m['cpus']} CPUs, {m['ram_gib']} GiB RAM, {m['fs']}, torch {m['torch']}; "
             "**shared with other engineers' work during the run** (load average in the last column); timed "
             f"processes in their own session at nice {res['nice']}. Methods ran in turn, round after round, in one "
             "run; warm cache; time is the median over rounds, peak RSS the largest (ru_maxrss of the command "
             "alone).", "",
             "| method | cache | time (s) | runs (s) | peak RSS (GiB) | CPU (s) | output (GB) | slime / rlexport "
             "(time) | load avg |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for key, rs in runs.items():
        method, cache = key.rsplit("-", 1)
        ok = [r for r in rs if r["rc"] == 0]
        if not ok:
            lines.append(f"| {LABELS[method]} | {cache} | failed (rc {rs[-1]['rc']}) | | | | | | |")
            continue
        rl = runs.get(f"rlexport-{cache}")
        ratio = ""
        if method == "slime" and rl:  # pair by pair: round k of slime against round k of rlexport
            pairs = [s["seconds"] / r["seconds"] for s, r in zip(rs, rl) if s["rc"] == 0 and r["rc"] == 0]
            ratio = f"{statistics.median(pairs):.2f}" if pairs else ""
        lines.append(f"| {LABELS[method]} | {cache} | {med(ok):.2f} | {', '.join('%.1f' % r['seconds'] for r in rs)} "
                     f"| {max(r['peak_rss'] for r in ok) / 2**30:.2f} | "
                     f"{statistics.median(r['cpu_seconds'] for r in ok):.1f} | {ok[0]['output_bytes'] / 1e9:.2f} | "
                     f"{ratio} | {statistics.median(r['load_before'] for r in ok):.1f} |")
    lines.append("")
    c = res.get("checks", {}).get("rlexport_vs_slime")
    if c:
        lines.append(f"- rlexport vs slime's converter (first warm outputs, tensor by tensor): {c['equal']}/"
                     f"{c['common']} common tensors byte-identical; only in rlexport: {c['only_rlexport'] or 'none'}; "
                     f"only in slime's: {c['only_llmc'] or 'none'}; differ: {c['differ'] or 'none'}.")
    harness.write_section(f"60-megatron-lm-{geometry}", lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:
        render(sys.argv[2] if len(sys.argv) > 2 else "1.5b")
    elif sys.argv[1:2] == ["--compare-only"]:  # make both outputs once, untimed, and compare them
        geometry = sys.argv[2] if len(sys.argv) > 2 else "1.5b"
        folder, out = DEFAULT_ROOT / f"megatron-lm-{geometry}", DEFAULT_ROOT / "out-megatron-lm"
        out.mkdir(exist_ok=True)
        kept = {}
        for method in ("rlexport", "slime"):
            kept[method] = out / f"kept-{method}"
            shutil.rmtree(kept[method], ignore_errors=True)
            subprocess.run(command(method, folder, kept[method], GEOMETRIES[geometry].vocab), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        res = json.loads((HERE / f"megatron-lm-{geometry}.json").read_text())
        res.setdefault("checks", {})["rlexport_vs_slime"] = compare(kept["rlexport"], kept["slime"])
        print(res["checks"])
        for p in kept.values():
            shutil.rmtree(p, ignore_errors=True)
        (HERE / f"megatron-lm-{geometry}.json").write_text(json.dumps(res, indent=2))
        render(geometry)
    else:
        main()

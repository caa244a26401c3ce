"""verl FSDP2 checkpoint export (issue 19): `rlexport export` of a verl rank-file checkpoint (world size 2) against
verl's own merger and the cp+sync floor, same run.

    .venv/bin/python bench/gen_verl.py --geometry 1.5b                 # the checkpoint (once)
    .venv/bin/python bench/verl_bench.py --geometry 1.5b --nice -15 --repeat 3

Methods, in turn, round after round (timing and peak RSS from bench/run.py's timed(): lean launcher, wait4
ru_maxrss of the command alone; warm = the rank files read once before each run):
  * floor: `cp -r ACTOR OUT && sync` (the actor folder: both rank files and huggingface/)
  * rlexport: `rlexport export RUN --out OUT --quiet` (RUN: the verl run folder; bf16 out, the config's dtype)
  * verl: `python -m verl.model_merger merge --backend fsdp --local_dir ACTOR --target_dir OUT && sync`
    (the venv $VERL_PYTHON names, verl 0.9.1; it writes bf16)
The first warm outputs of rlexport and verl are compared tensor by tensor. Results: bench/verl-<geometry>.json
and the section bench/RESULTS.d/30-verl-<geometry>.md of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as harness  # noqa: E402
from gen import DEFAULT_ROOT, GEOMETRIES, venv_python  # noqa: E402
from quant import compare  # noqa: E402

LABELS = {"floor": "`cp -r` actor/ + `sync` (floor)", "rlexport": "`rlexport export` (verl run folder)",
          "verl": "verl's merger (`python -m verl.model_merger merge --backend fsdp`) + `sync`"}


def command(method: str, run: Path, out: Path) -> list[str]:
    actor = run / "global_step_1" / "actor"
    if method == "floor":
        return ["sh", "-c", f"cp -r '{actor}' '{out}' && sync"]
    if method == "rlexport":
        return [harness.RLEXPORT, "export", str(run), "--out", str(out), "--quiet"]
    if method == "verl":
        verl_py = venv_python("VERL_PYTHON", "verl")
        return ["sh", "-c", f"'{verl_py}' -m verl.model_merger merge --backend fsdp --local_dir '{actor}' "
                            f"--target_dir '{out}' && sync"]
    raise ValueError(method)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="1.5b")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--cache", default="warm")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--verl-repeat", type=int, default=2)
    ap.add_argument("--nice", type=int, default=0)
    args = ap.parse_args()
    harness.NICE = args.nice
    run = args.root / f"verl-{args.geometry}"
    if not (run / ".complete").exists():
        sys.exit(f"no checkpoint at {run}: run bench/gen_verl.py --geometry {args.geometry} first")
    dev = harness.disk_of(args.root)
    logs = args.root / f"logs-verl-{args.geometry}"
    logs.mkdir(exist_ok=True)
    res = {"geometry": args.geometry, "model": GEOMETRIES[args.geometry].name, "machine": harness.machine(),
           "nice": args.nice, "input_bytes": harness.output_bytes(run / "global_step_1" / "actor"),
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}, "checks": {}}
    out = args.root / "out-verl"
    kept: dict[str, Path] = {}
    for cache in [c.strip() for c in args.cache.split(",")]:
        cold = cache == "cold"
        for rnd in range(max(args.repeat, args.verl_repeat)):
            for method in ("floor", "rlexport", "verl"):
                if rnd >= (args.verl_repeat if method == "verl" else args.repeat):
                    continue
                target = out / method
                shutil.rmtree(target, ignore_errors=True)
                target.parent.mkdir(exist_ok=True)
                os.sync()
                dropped = harness.drop_caches() if cold else None
                if not cold:
                    harness.warm_up([run])
                r = harness.timed(command(method, run, target), dev, logs / f"{method}-{cache}-{rnd}.log")
                r["caches_dropped"] = dropped
                r["output_bytes"] = harness.output_bytes(target)
                print(f"{cache} round {rnd} {method}: {r['seconds']:.2f}s peak {r['peak_rss'] / 2**30:.2f} GiB "
                      f"rc={r['rc']} load {r['load_before']:.1f}", flush=True)
                res["runs"].setdefault(f"{method}-{cache}", []).append(r)
                if not cold and method != "floor" and method not in kept and r["rc"] == 0:
                    kept[method] = out / f"kept-{method}"
                    shutil.rmtree(kept[method], ignore_errors=True)
                    target.rename(kept[method])
                else:
                    shutil.rmtree(target, ignore_errors=True)
                (HERE / f"verl-{args.geometry}.json").write_text(json.dumps(res, indent=2))
    if len(kept) == 2:
        res["checks"]["rlexport_vs_verl"] = compare(kept["rlexport"], kept["verl"])
        print(res["checks"], flush=True)
    for p in kept.values():
        shutil.rmtree(p, ignore_errors=True)
    (HERE / f"verl-{args.geometry}.json").write_text(json.dumps(res, indent=2))
    render(args.geometry)


def render(geometry: str) -> None:
    res = json.loads((HERE / f"verl-{geometry}.json").read_text())
    m, runs = res["machine"], res["runs"]
    med = lambda rs: statistics.median(r["seconds"] for r in rs if r["rc"] == 0)  # noqa: E731
    lines = [f"## verl FSDP2 checkpoint (issue 19): {res['model']} geometry, world size 2, bf16 DTensor rank files "
             f"({res['input_bytes'] / 1e9:.2f} GB actor folder)", "",
             f"`bench/gen_verl.py` + `bench/verl_bench.py` (run {res['started']}). Machine: {m['cpus']} CPUs, "
             f"{m['ram_gib']} GiB RAM, {m['fs']}, torch {m['torch']}; **shared with another engineer's work during "
             f"the run** (load average in the last column); timed processes in their own session at nice "
             f"{res['nice']}. Methods ran in turn, round after round, in one run; time is the median over rounds, "
             "peak RSS the largest (ru_maxrss of the command alone).", "",
             "| method | cache | time (s) | runs (s) | peak RSS (GiB) | CPU (s) | output (GB) | / floor | "
             "verl / rlexport | load avg |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for key, rs in runs.items():
        method, cache = key.rsplit("-", 1)
        ok = [r for r in rs if r["rc"] == 0]
        if not ok:
            lines.append(f"| {LABELS[method]} | {cache} | failed (rc {rs[-1]['rc']}) | | | | | | | |")
            continue
        fl, rl = runs.get(f"floor-{cache}"), runs.get(f"rlexport-{cache}")
        r1 = f"{med(ok) / med(fl):.2f}" if fl and method != "floor" else ""
        r2 = f"{med(ok) / med(rl):.2f}" if rl and method == "verl" else ""
        lines.append(f"| {LABELS[method]} | {cache} | {med(ok):.2f} | {', '.join('%.1f' % r['seconds'] for r in rs)} "
                     f"| {max(r['peak_rss'] for r in ok) / 2**30:.2f} | "
                     f"{statistics.median(r['cpu_seconds'] for r in ok):.1f} | {ok[0]['output_bytes'] / 1e9:.2f} | "
                     f"{r1} | {r2} | {statistics.median(r['load_before'] for r in ok):.1f} |")
    lines.append("")
    c = res.get("checks", {}).get("rlexport_vs_verl")
    if c:
        lines.append(f"- rlexport vs verl's merger (first warm outputs, tensor by tensor): {c['equal']}/{c['common']} "
                     f"common tensors byte-identical; only in rlexport: {c['only_rlexport'] or 'none'}; only in "
                     f"verl's: {c['only_llmc'] or 'none'}; differ: {c['differ'] or 'none'}.")
    harness.write_section(f"30-verl-{geometry}", lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:
        render(sys.argv[2] if len(sys.argv) > 2 else "1.5b")
    elif sys.argv[1:2] == ["--compare-only"]:  # make both outputs once, untimed, and compare them
        import subprocess
        geometry = sys.argv[2] if len(sys.argv) > 2 else "1.5b"
        root = DEFAULT_ROOT
        run, out = root / f"verl-{geometry}", root / "out-verl"
        out.mkdir(exist_ok=True)
        kept = {}
        for method in ("rlexport", "verl"):
            kept[method] = out / f"kept-{method}"
            shutil.rmtree(kept[method], ignore_errors=True)
            subprocess.run(command(method, run, kept[method]), check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        res = json.loads((HERE / f"verl-{geometry}.json").read_text())
        res.setdefault("checks", {})["rlexport_vs_verl"] = compare(kept["rlexport"], kept["verl"])
        print(res["checks"])
        for p in kept.values():
            shutil.rmtree(p, ignore_errors=True)
        (HERE / f"verl-{geometry}.json").write_text(json.dumps(res, indent=2))
        render(geometry)
    else:
        main()

"""Quantized export (issue 18): `rlexport export --quantize int8|w4a16` against the cp+sync floor, the unquantized
`rlexport export`, and transformers + PEFT merge + llm-compressor `oneshot` (bench/llmc_standard.py), same run.

    .venv/bin/python bench/quant.py --geometry 1.5b --nice -15 --repeat 3          # warm cells, interleaved
    .venv/bin/python bench/quant.py --geometry 1.5b --cache cold,warm --repeat 3

Inputs: bench/gen.py's base + rank-64 float32 LoRA on all 7 linears (the same inputs as bench/run.py). Each round
runs every method once, in turn (A B C ... A B C ...), so drift of a shared machine hits all of them alike; the
llm-compressor path runs once per cache state (--llmc-repeat). Timing and peak RSS come from bench/run.py's
timed() (lean launcher, wait4 ru_maxrss of the command alone). The first warm output of each rlexport --quantize
scheme and of the matching llm-compressor scheme is kept and compared tensor by tensor. Results go to
bench/quant-<geometry>.json and the section bench/RESULTS.d/20-quant-<geometry>.md of RESULTS.md.
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
from gen import DEFAULT_ROOT, GEOMETRIES, LINEAR, ensure_inputs, venv_python  # noqa: E402

LLMC_SCHEME = {"int8": "W8A8", "w4a16": "W4A16", "fp8": "FP8_DYNAMIC"}


def command(method: str, base: Path, adapter: Path, out: Path) -> list[str]:
    if method in ("floor", "rlexport"):
        return harness.commands(method, base, adapter, out)
    if method.startswith("rlexport-"):
        return [harness.RLEXPORT, "export", str(adapter), "--base", str(base), "--out", str(out), "--quiet",
                "--quantize", method.removeprefix("rlexport-")]
    if method.startswith("llmc-"):
        return [venv_python("LLMC_PYTHON", "llm-compressor"), str(HERE / "llmc_standard.py"), str(base),
                str(adapter), str(out), LLMC_SCHEME[method.removeprefix("llmc-")]]
    raise ValueError(method)


def label(method: str) -> str:
    if method == "floor":
        return "`cp -r` + `sync` (floor)"
    if method == "rlexport":
        return "`rlexport export` (unquantized bf16)"
    if method.startswith("rlexport-"):
        return f"`rlexport export --quantize {method.removeprefix('rlexport-')}`"
    s = method.removeprefix("llmc-")
    return f"transformers + PEFT merge + llm-compressor `oneshot` {LLMC_SCHEME[s]}"


def tensors_of(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def compare(a: Path, b: Path) -> dict:
    """Tensor by tensor: same names, dtypes, shapes and bytes?"""
    import torch
    from safetensors import safe_open
    ta, tb = tensors_of(a), tensors_of(b)
    handles: dict = {}

    def get(p, k):
        if p not in handles:
            handles[p] = safe_open(p, "pt")
        return handles[p].get_tensor(k)
    common = sorted(set(ta) & set(tb))
    equal = [k for k in common if torch.equal(get(ta[k], k), get(tb[k], k))]
    cfg = [json.loads((x / "config.json").read_text()).get("quantization_config", {})
           if (x / "config.json").exists() else {} for x in (a, b)]
    groups = [sorted((g.get("weights") or {}).items()) for c in cfg for g in c.get("config_groups", {}).values()]
    return {"common": len(common), "equal": len(equal), "only_rlexport": sorted(set(ta) - set(tb))[:10],
            "only_llmc": sorted(set(tb) - set(ta))[:10], "differ": sorted(set(common) - set(equal))[:10],
            "format": [c.get("format") for c in cfg], "weights_args_equal": len(groups) == 2 and
            groups[0] == groups[1], "ignore": [c.get("ignore") for c in cfg]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="1.5b")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--schemes", default="int8,w4a16")
    ap.add_argument("--cache", default="warm", help="cold,warm or one of them")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the fast methods (median reported)")
    ap.add_argument("--llmc-repeat", type=int, default=1)
    ap.add_argument("--no-llmc", action="store_true")
    ap.add_argument("--no-compare", action="store_true")
    ap.add_argument("--nice", type=int, default=0)
    args = ap.parse_args()
    harness.NICE = args.nice
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    base, adapter = ensure_inputs(args.geometry, args.root, rank=64, targets=LINEAR)
    dev = harness.disk_of(args.root)
    logs = args.root / f"logs-quant-{args.geometry}"
    logs.mkdir(exist_ok=True)
    fast = ["floor", "rlexport"] + [f"rlexport-{s}" for s in schemes]
    slow = [] if args.no_llmc else [f"llmc-{s}" for s in schemes]
    res = {"geometry": args.geometry, "model": GEOMETRIES[args.geometry].name, "machine": harness.machine(),
           "nice": args.nice, "input_bytes": harness.output_bytes(base) + harness.output_bytes(adapter),
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}, "checks": {}}
    out = args.root / "out-quant"
    kept: dict[str, Path] = {}
    for cache in [c.strip() for c in args.cache.split(",")]:
        cold = cache == "cold"
        for rnd in range(max(args.repeat, args.llmc_repeat)):
            for method in fast + slow:
                if rnd >= (args.llmc_repeat if method in slow else args.repeat):
                    continue
                target = out / method
                shutil.rmtree(target, ignore_errors=True)
                os.sync()
                dropped = harness.drop_caches() if cold else None
                if not cold:
                    harness.warm_up([base, adapter])
                r = harness.timed(command(method, base, adapter, target), dev, logs / f"{method}-{cache}-{rnd}.log")
                r["caches_dropped"] = dropped
                r["output_bytes"] = harness.output_bytes(target)
                if method in slow and r["rc"] == 0:
                    try:
                        r["phases"] = json.loads((logs / f"{method}-{cache}-{rnd}.log").read_text()
                                                 .strip().splitlines()[-1])["phases"]
                    except (ValueError, KeyError, IndexError):
                        pass
                print(f"{cache} round {rnd} {method}: {r['seconds']:.2f}s peak {r['peak_rss'] / 2**30:.2f} GiB "
                      f"rc={r['rc']} load {r['load_before']:.1f}", flush=True)
                res["runs"].setdefault(f"{method}-{cache}", []).append(r)
                keep = (not cold and not args.no_compare and method not in kept and r["rc"] == 0
                        and method.startswith(("rlexport-", "llmc-")))
                if keep:
                    kept[method] = out / f"kept-{method}"
                    shutil.rmtree(kept[method], ignore_errors=True)
                    target.rename(kept[method])
                else:
                    shutil.rmtree(target, ignore_errors=True)
                (HERE / f"quant-{args.geometry}.json").write_text(json.dumps(res, indent=2))
    checks(res, schemes, kept)
    for p in kept.values():
        shutil.rmtree(p, ignore_errors=True)
    (HERE / f"quant-{args.geometry}.json").write_text(json.dumps(res, indent=2))
    render(args.geometry)


def checks(res: dict, schemes: list[str], kept: dict[str, Path]) -> None:
    for s in schemes:
        a, b = kept.get(f"rlexport-{s}"), kept.get(f"llmc-{s}")
        if a and b:
            res["checks"][s] = compare(a, b)
            print(s, res["checks"][s], flush=True)


def compare_only(geometry: str, root: Path, schemes: list[str]) -> None:
    """Make each quantized output once (untimed) and compare rlexport's with llm-compressor's, into the results."""
    base, adapter = ensure_inputs(geometry, root, rank=64, targets=LINEAR)
    res = json.loads((HERE / f"quant-{geometry}.json").read_text())
    kept = {}
    for s in schemes:
        for method in (f"rlexport-{s}", f"llmc-{s}"):
            target = root / "out-quant" / f"kept-{method}"
            shutil.rmtree(target, ignore_errors=True)
            import subprocess
            subprocess.run(command(method, base, adapter, target), check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            kept[method] = target
    checks(res, schemes, kept)
    for p in kept.values():
        shutil.rmtree(p, ignore_errors=True)
    (HERE / f"quant-{geometry}.json").write_text(json.dumps(res, indent=2))
    render(geometry)


def med(runs: list[dict]) -> float:
    return statistics.median(r["seconds"] for r in runs if r["rc"] == 0)


def render(geometry: str) -> None:
    res = json.loads((HERE / f"quant-{geometry}.json").read_text())
    m = res["machine"]
    runs = res["runs"]
    caches = [c for c in ("cold", "warm") if any(k.endswith("-" + c) for k in runs)]
    lines = [f"## Quantized export (issue 18): {res['model']} geometry, bf16 base + rank-64 float32 LoRA on all 7 "
             f"linears ({res['input_bytes'] / 1e9:.2f} GB input)", "",
             f"`bench/quant.py` (run {res['started']}). Machine: {m['cpus']} CPUs, {m['ram_gib']} GiB RAM, {m['fs']}, "
             f"torch {m['torch']}; **shared with another engineer's work during the run** (load average in the last "
             f"column); timed processes in their own session at nice {res['nice']}. Methods ran in turn, round after "
             "round, in one run; time is the median over rounds (every run's time in "
             f"`bench/quant-{geometry}.json`), peak RSS the largest over rounds (ru_maxrss of the command alone).", "",
             "| method | cache | time (s) | runs (s) | peak RSS (GiB) | CPU (s) | output (GB) | / floor | "
             "/ unquantized rlexport | load avg |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for cache in caches:
        floor = runs.get(f"floor-{cache}")
        unq = runs.get(f"rlexport-{cache}")
        for key, rs in runs.items():
            if not key.endswith("-" + cache):
                continue
            method = key.removesuffix("-" + cache)
            ok = [r for r in rs if r["rc"] == 0]
            if not ok:
                lines.append(f"| {label(method)} | {cache} | failed (rc {rs[-1]['rc']}) | | "
                             f"{max(r['peak_rss'] for r in rs) / 2**30:.2f} | | | | | |")
                continue
            t = med(ok)
            r1 = f"{t / med(floor):.2f}" if floor and method != "floor" else ""
            r2 = f"{t / med(unq):.2f}" if unq and method not in ("floor", "rlexport") else ""
            lines.append(f"| {label(method)} | {cache} | {t:.2f} | {', '.join('%.1f' % r['seconds'] for r in rs)} | "
                         f"{max(r['peak_rss'] for r in ok) / 2**30:.2f} | "
                         f"{statistics.median(r['cpu_seconds'] for r in ok):.1f} | "
                         f"{ok[0]['output_bytes'] / 1e9:.2f} | {r1} | {r2} | "
                         f"{statistics.median(r['load_before'] for r in ok):.1f} |")
    lines.append("")
    for key, rs in runs.items():
        if key.startswith("llmc-") and rs[0].get("phases"):
            lines.append(f"{label(key.rsplit('-', 1)[0])} phases ({key.rsplit('-', 1)[1]}): "
                         + ", ".join(f"{k} {v:.1f}s" for k, v in rs[0]["phases"].items()) + ".")
    for s, c in res.get("checks", {}).items():
        lines.append(f"- `--quantize {s}` vs llm-compressor {LLMC_SCHEME[s]} (first warm outputs, tensor by tensor): "
                     f"{c['equal']}/{c['common']} common tensors byte-identical; only in rlexport: "
                     f"{c['only_rlexport'] or 'none'}; only in llm-compressor: {c['only_llmc'] or 'none'}; "
                     f"differ: {c['differ'] or 'none'}; formats {c['format']}; weight args equal: "
                     f"{c['weights_args_equal']}; ignore {c['ignore']}.")
    harness.write_section(f"20-quant-{geometry}", lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:
        render(sys.argv[2] if len(sys.argv) > 2 else "1.5b")
    elif sys.argv[1:2] == ["--compare-only"]:  # --compare-only GEOMETRY [SCHEMES]
        compare_only(sys.argv[2], DEFAULT_ROOT,
                     (sys.argv[3] if len(sys.argv) > 3 else "int8,w4a16").split(","))
    else:
        main()

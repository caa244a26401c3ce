"""rlexport export vs the standard transformers+PEFT path vs `cp -r` + `sync`, in one run, cold and warm.

    python bench/run.py --geometry 1.5b            # Qwen2-1.5B geometry, rank-64 LoRA on all 7 linear modules
    python bench/run.py --geometry 7b              # Qwen2-7B geometry (15 GB; the standard path needs ~17 GB RAM)
    python bench/run.py --render                   # only rebuild bench/RESULTS.md from bench/results-*.json

Inputs are generated once (fixed seed, no download) under --root (default $RLEXPORT_BENCH_ROOT, else <tmp>/rlexport-bench), outside the
repo; outputs are deleted after each run; --clean removes the inputs at the end. Cold runs drop the page cache
first (needs root; otherwise the run is marked "not dropped"). Peak RSS is the kernel's high-water mark of the
command (wait4 ru_maxrss, mapped file pages included; taken by a lean launcher, see timed()), output bytes are
the files' sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from gen import DEFAULT_ROOT, GEOMETRIES, LINEAR, ensure_inputs  # noqa: E402

PY = sys.executable
RLEXPORT = str(Path(PY).with_name("rlexport"))


# ---- machine state -------------------------------------------------------------------------------------------

def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm_up(paths: list[Path]) -> None:
    """Read every input file once so that it sits in the page cache."""
    buf = bytearray(16 << 20)
    for root in paths:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass


def disk_of(path: Path) -> str | None:
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if int(f[0]) == major and int(f[1]) == minor:
            name = f[2]
            # a partition: account its whole disk (io_ticks is per device)
            parent = Path(f"/sys/class/block/{name}/..").resolve().name
            return parent if Path(f"/sys/block/{parent}").exists() else name
    return None


def diskstats(dev: str | None) -> dict:
    if dev is None:
        return {}
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] == dev:
            return {"read_bytes": int(f[5]) * 512, "write_bytes": int(f[9]) * 512, "busy_ms": int(f[12])}
    return {}


def output_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def memavailable() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- one timed run -------------------------------------------------------------------------------------------

NICE = 0  # --nice: priority of the benchmarked processes (negative = ahead of other work on a shared machine)


def _oom_first() -> None:
    # if the machine runs out of memory, let the kernel kill the benchmarked process, not a neighbour
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    if NICE:
        # a session of its own, whose autogroup gets the priority: with CONFIG_SCHED_AUTOGROUP the scheduler shares
        # the CPUs between sessions first, so a plain nice value does nothing against other sessions' work
        os.setsid()
        for path, value in (("/proc/self/autogroup", NICE),):
            try:
                Path(path).write_text(f"{value}\n")
            except OSError:
                pass
        try:
            os.setpriority(os.PRIO_PROCESS, 0, NICE)
        except OSError:
            pass


# Linux keeps a process's peak RSS across fork + exec (signal->maxrss records the forked copy of this bench
# process, torch imported, ~150 MB): a command started directly would report at least that. A lean launcher
# forks the command from itself and reports the command's own rusage (its own peak: a few MB of launcher at most).
_LAUNCH = """import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss_kb": ru.ru_maxrss, "cpu": ru.ru_utime + ru.ru_stime, "rc": os.waitstatus_to_exitcode(status)}, f)
"""


def timed(cmd: list[str], dev: str | None, log: Path) -> dict:
    before = diskstats(dev)
    load = os.getloadavg()[0]
    usage = log.with_suffix(".rusage.json")
    with open(log, "wb") as out:
        t = time.perf_counter()
        proc = subprocess.Popen([PY, "-S", "-c", _LAUNCH, str(usage), *cmd], stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_oom_first)
        proc.wait()
        wall = time.perf_counter() - t
    ru = json.loads(usage.read_text())
    proc.returncode = ru["rc"]
    after = diskstats(dev)
    res = {"seconds": wall, "peak_rss": ru["maxrss_kb"] * 1024, "cpu_seconds": ru["cpu"],
           "rc": proc.returncode, "load_before": load}
    if before and after:
        res["disk"] = {k: after[k] - before[k] for k in before}
    if proc.returncode != 0:
        res["error"] = log.read_text(errors="replace")[-2000:]
    return res


# ---- the three methods ---------------------------------------------------------------------------------------

def commands(method: str, base: Path, adapter: Path, out: Path) -> list[str]:
    if method == "floor":
        return ["sh", "-c", f"mkdir -p '{out}' && cp -r '{base}' '{out}/base' && cp -r '{adapter}' '{out}/adapter' "
                            "&& sync"]
    if method == "standard":
        return [PY, str(HERE / "standard.py"), str(base), str(adapter), str(out)]
    if method == "rlexport":
        return [RLEXPORT, "export", str(adapter), "--base", str(base), "--out", str(out), "--quiet"]
    raise ValueError(method)


def measure(method: str, base: Path, adapter: Path, out: Path, dev: str | None, *, cold: bool, logs: Path,
            keep: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    dropped = None
    if cold:
        dropped = drop_caches()
    else:
        warm_up([base, adapter])
    r = timed(commands(method, base, adapter, out), dev, logs / f"{method}-{'cold' if cold else 'warm'}.log")
    r["caches_dropped"] = dropped
    r["output_bytes"] = output_bytes(out)
    if method == "standard" and r["rc"] == 0:
        try:
            r["phases"] = json.loads((logs / f"{method}-{'cold' if cold else 'warm'}.log").read_text()
                                     .strip().splitlines()[-1])["phases"]
        except (ValueError, KeyError, IndexError):
            pass
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    os.sync()
    return r


# ---- correctness ---------------------------------------------------------------------------------------------

def check_outputs(base: Path, adapter: Path, out: Path, rank: int) -> dict:
    """Every tensor of `out` against the float32 reference W + (B @ A) * s (PEFT's order), in bf16 ulps."""
    import torch
    from safetensors import safe_open

    def files(folder: Path) -> dict[str, Path]:
        idx = folder / "model.safetensors.index.json"
        if idx.exists():
            return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {k: folder / "model.safetensors" for k in f.keys()}

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    base_files, out_files = files(base), files(out)
    handles: dict[Path, object] = {}

    def h(p: Path):
        if p not in handles:
            handles[p] = safe_open(p, "pt")
        return handles[p]

    ad = safe_open(adapter / "adapter_model.safetensors", "pt")
    stats = {"merged_tensors": 0, "unchanged_tensors": 0, "unchanged_equal": 0, "elements": 0,
             "max_ulp": 0.0, "not_correctly_rounded": 0, "missing": []}
    for name, bf in base_files.items():
        if name not in out_files:
            stats["missing"].append(name)
            continue
        W = h(bf).get_slice(name)
        O = h(out_files[name]).get_slice(name)
        module = name.removesuffix(".weight")
        akey = f"base_model.model.{module}.lora_A.weight"
        if akey not in ad.keys():
            stats["unchanged_tensors"] += 1
            stats["unchanged_equal"] += bool(torch.equal(h(bf).get_tensor(name), h(out_files[name]).get_tensor(name)))
            continue
        stats["merged_tensors"] += 1
        A = ad.get_tensor(akey).float()
        B = ad.get_tensor(f"base_model.model.{module}.lora_B.weight").float()
        rows = W.get_shape()[0]
        delta = (B @ A) * scale  # PEFT's get_delta_weight, whole, in float32
        for s in range(0, rows, 4096):
            e = min(rows, s + 4096)
            ref = W[s:e].float() + delta[s:e]
            got = O[s:e]
            # an element equal to the correctly rounded reference is within 0.5 ulp of it by definition; the
            # error is computed where they differ
            bad = got != ref.to(torch.bfloat16)
            n_bad = int(bad.sum())
            if n_bad:
                err = ulp_error(got[bad], ref[bad])
                stats["max_ulp"] = max(stats["max_ulp"], float(err.max()))
                stats["sum_ulp_bad"] = stats.get("sum_ulp_bad", 0.0) + float(err.sum())
            else:
                stats["max_ulp"] = max(stats["max_ulp"], 0.5)
            stats["not_correctly_rounded"] += n_bad
            stats["elements"] += got.numel()
    return stats


def ulp_error(got, ref):
    """|got - ref| in units of the bf16 spacing at ref (correct rounding gives <= 0.5)."""
    import torch
    _, e = torch.frexp(ref)
    ulp = torch.ldexp(torch.ones_like(ref), (e - 8).clamp_min(-133))  # bf16 has 8 significant bits
    return (got.float() - ref).abs() / ulp


# ---- profile -------------------------------------------------------------------------------------------------

def profile(base: Path, adapter: Path, out: Path, logs: Path, dev: str | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    drop_caches()
    log = logs / "profile.log"
    r = timed([PY, str(HERE / "profile_export.py"), str(adapter), str(base), str(out), str(logs / "profile.json")],
              dev, log)
    shutil.rmtree(out, ignore_errors=True)
    try:
        prof = json.loads((logs / "profile.json").read_text())
    except (OSError, ValueError):
        prof = {"error": log.read_text(errors="replace")[-2000:]}
    prof["process"] = r
    t = time.perf_counter()
    subprocess.run([PY, "-c", "import rlexport.cli"], check=True)
    prof["import_rlexport_cli_warm"] = time.perf_counter() - t
    return prof


# ---- main ----------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="1.5b")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--targets", default=",".join(LINEAR), help="comma-separated module names")
    ap.add_argument("--adapter-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the saved LoRA factors (PEFT saves float32 unless told otherwise)")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; the table shows the median")
    ap.add_argument("--methods", default="floor,rlexport,standard")
    ap.add_argument("--standard", choices=["auto", "run", "skip"], default="auto",
                    help="auto: run the standard path only if MemAvailable covers the model x 1.25 + 2 GiB")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--clean", action="store_true", help="delete the generated inputs at the end")
    ap.add_argument("--nice", type=int, default=0, help="run the timed processes at this nice value (root: "
                    "negative values put them ahead of other work on a shared machine)")
    ap.add_argument("--render", action="store_true", help="only rebuild RESULTS.md from results-*.json")
    args = ap.parse_args()
    global NICE
    NICE = args.nice
    if args.render:
        render()
        return
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    geo = GEOMETRIES[args.geometry]
    args.root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.root).free
    generated = (args.root / f"base-{args.geometry}" / ".complete").exists()
    need = geo.nbytes * (1.15 if generated else 2.3)  # one output at a time (+ the inputs if not generated yet)
    if free < need:
        sys.exit(f"need ~{need / 1e9:.0f} GB free under {args.root}, have {free / 1e9:.0f} GB")
    import torch
    adapter_dtype = getattr(torch, args.adapter_dtype)
    base, adapter = ensure_inputs(args.geometry, args.root, rank=args.rank, targets=targets,
                                  adapter_dtype=adapter_dtype)
    tag = args.geometry + ("" if args.adapter_dtype == "float32" else f"-{args.adapter_dtype}-adapter")
    logs = args.root / f"logs-{tag}"
    logs.mkdir(exist_ok=True)
    out = args.root / "out"
    dev = disk_of(args.root)
    input_bytes = output_bytes(base) + output_bytes(adapter)
    results: dict = {"geometry": args.geometry, "model": geo.name, "rank": args.rank, "targets": list(targets),
                     "input_bytes": input_bytes, "machine": machine(), "nice": args.nice,
                     "adapter_dtype": args.adapter_dtype, "runs": {}}
    methods = [m.strip() for m in args.methods.split(",")]
    for method in methods:
        if method == "standard":
            need_mem = geo.nbytes * 1.25 + (2 << 30)
            if args.standard == "skip" or (args.standard == "auto" and memavailable() < need_mem):
                results["runs"]["standard"] = {"skipped": f"not run: needs ~{need_mem / 2**30:.0f} GiB of RAM "
                                                          f"(MemAvailable {memavailable() / 2**30:.1f} GiB)"}
                continue
        for cold in (True, False):
            key = f"{method}-{'cold' if cold else 'warm'}"
            tries = []
            for i in range(args.repeat if method != "standard" else 1):
                keep = method in ("rlexport", "standard") and not cold and not args.no_check and i == 0
                r = measure(method, base, adapter, out, dev, cold=cold, logs=logs, keep=keep)
                print(f"{key}: {r['seconds']:.2f}s peak RSS {r['peak_rss'] / 2**30:.2f} GiB rc={r['rc']}", flush=True)
                tries.append(r)
                if keep:
                    if r["rc"] == 0:
                        t = time.perf_counter()
                        results.setdefault("checks", {})[method] = check_outputs(base, adapter, out, args.rank)
                        print(f"checked {method} in {time.perf_counter() - t:.0f}s: "
                              f"{results['checks'][method]}", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                if r["rc"] != 0:
                    break
            ok = sorted((x for x in tries if x["rc"] == 0), key=lambda x: x["seconds"])
            best = ok[(len(ok) - 1) // 2] if ok else tries[-1]  # the median run (the lower one of an even count)
            best["all_seconds"] = [x["seconds"] for x in tries]
            results["runs"][key] = best
    if not args.no_profile and "rlexport" in methods:
        results["profile"] = profile(base, adapter, out, logs, dev)
    (HERE / f"results-{tag}.json").write_text(json.dumps(results, indent=2))
    render()
    if args.clean:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(adapter, ignore_errors=True)


def machine() -> dict:
    import torch
    return {"cpus": len(os.sched_getaffinity(0)), "ram_gib": round(os.sysconf("SC_PAGE_SIZE") *
                                                                     os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "kernel": platform.release(), "fs": _fs_type(Path("/work"))}


def _fs_type(path: Path) -> str:
    best = ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, fs, *_ = line.split()
        if str(path).startswith(mnt) and len(mnt) > len(best[0]):
            best = (mnt, fs)
    return best[1]


# ---- RESULTS.md ----------------------------------------------------------------------------------------------

def _t(r: dict | None) -> float:
    """A cell's time: the median of its runs (all of them are in the results file)."""
    xs = sorted(r.get("all_seconds") or [r["seconds"]])
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def write_section(name: str, lines: list[str]) -> None:
    """bench/RESULTS.d/<name>.md, appended to RESULTS.md by render() (the other benchmark scripts' tables)."""
    out = HERE / "RESULTS.d" / f"{name}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    render()


def render() -> None:
    parts = [
        "# Export benchmark: rlexport vs transformers+PEFT vs the cp+sync floor", "",
        "Generated by `python bench/run.py --geometry {1.5b,7b}` (see bench/README.md); numbers from one run "
        "per geometry on the machine listed. *Cold*: page cache dropped before the run; *warm*: inputs read "
        "once before it. Time is the whole process (imports included) until the output is on disk (rlexport "
        "fsyncs; the others end with `sync`), the median where a cell was run several times (every time is in "
        "`bench/results-*.json`; the other columns are from one of those runs). Peak RSS: kernel high-water mark "
        "(ru_maxrss) of the command alone (a lean launcher forks it: started from the bench process directly, it "
        "would inherit the bench's own ~150 MB as its peak), mapped file pages included. CPU: user + system "
        "seconds of the command.", ""]
    analysis = HERE / "analysis.md"
    if analysis.exists():
        parts += [analysis.read_text().strip(), ""]
    extra = []
    for f in sorted(HERE.glob("results-*.json")):
        res = json.loads(f.read_text())
        runs = res["runs"]
        if res.get("adapter_dtype", "float32") != "float32":
            extra.append(res)
            continue
        m = res["machine"]
        parts += [f"## {res['model']} geometry, bf16, LoRA rank {res['rank']} ({res.get('adapter_dtype', 'float32')} "
                  f"factors) on {', '.join(res['targets'])} ({res['input_bytes'] / 1e9:.2f} GB input)", "",
                  f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, {m['fs']}, "
                  f"torch {m['torch']}, kernel {m['kernel']}."
                  + (f" Timed processes ran in their own session at nice {res['nice']} (autogroup): the machine "
                     "was shared with other jobs (load average in the last column)." if res.get("nice") else ""),
                  "",
                  "| method | cache | time (s) | peak RSS (GiB) | CPU (s) | output (GB) | rlexport / floor | "
                  "standard / rlexport | load avg |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for method, label in (("floor", "`cp -r` + `sync` (floor)"), ("rlexport", "`rlexport export`"),
                              ("standard", "transformers + PEFT (bf16)")):
            for cache in ("cold", "warm"):
                r = runs.get(f"{method}-{cache}")
                if r is None and method == "standard" and "standard" in runs:
                    if cache == "cold":
                        parts.append(f"| {label} | — | {runs['standard']['skipped']} | | | | | | |")
                    continue
                if r is None:
                    continue
                fl, rl, st = (runs.get(f"{x}-{cache}") for x in ("floor", "rlexport", "standard"))
                ratio1 = f"{_t(rl) / _t(fl):.2f}" if method == "rlexport" and fl and rl else ""
                ratio2 = f"{_t(st) / _t(rl):.2f}" if method == "standard" and st and rl else ""
                if r.get("rc", 0) != 0:
                    parts.append(f"| {label} | {cache} | failed (rc {r['rc']}) | {r['peak_rss'] / 2**30:.2f} "
                                 "| | | | | |")
                    continue
                dropped = "" if r.get("caches_dropped") in (True, None) else " (not dropped)"
                n = len(r.get("all_seconds") or [1])
                runs_note = f" (median of {n})" if n > 1 else ""
                parts.append(f"| {label} | {cache}{dropped} | {_t(r):.2f}{runs_note} | {r['peak_rss'] / 2**30:.2f} | "
                             f"{r['cpu_seconds']:.1f} | {r['output_bytes'] / 1e9:.2f} | {ratio1} | {ratio2} | "
                             f"{r['load_before']:.1f} |")
        parts.append("")
        st = runs.get("standard-cold") or {}
        if st.get("phases"):
            parts.append("Standard path phases (cold): " + ", ".join(f"{k} {v:.1f}s" for k, v in st["phases"].items())
                         + ".")
            parts.append("")
        for method, c in res.get("checks", {}).items():
            bad = c["not_correctly_rounded"]
            how = ("every element is the correctly rounded reference (error <= 0.5 ulp)" if not bad else
                   f"{bad:,} elements ({bad / max(1, c['elements']):.3%}) are not the correctly rounded reference, "
                   f"off by up to {c['max_ulp']:.2f} ulp (mean {c.get('sum_ulp_bad', 0) / bad:.2f} ulp where off)")
            parts.append(f"- **{method}** vs the float32 reference `W + (B @ A) * alpha/r` rounded once to bf16: "
                         f"{c['merged_tensors']} merged tensors, {c['elements']:,} elements: {how}; "
                         f"{c['unchanged_equal']}/{c['unchanged_tensors']} untouched tensors byte-identical"
                         + (f"; missing: {c['missing'][:3]}" if c["missing"] else "") + ".")
        parts.append("")
        prof = res.get("profile")
        if prof and "stages" in prof:
            parts += profile_md(prof)
    for res in extra:  # other adapter dtypes: only what the checks say
        parts += [f"## {res['model']} geometry, LoRA rank {res['rank']} with {res['adapter_dtype']} factors: checks "
                  f"only (timings in {'results-' + res['geometry'] + '-' + res['adapter_dtype'] + '-adapter.json'})",
                  ""]
        for method, c in res.get("checks", {}).items():
            bad = c["not_correctly_rounded"]
            parts.append(f"- **{method}**: {c['elements']:,} merged elements, "
                         + ("every one the correctly rounded float32 reference." if not bad else
                            f"{bad:,} not the correctly rounded float32 reference (up to {c['max_ulp']:.2f} ulp)."))
        parts.append("")
    # sections rendered by the other bench scripts (quant.py, verl_bench.py, plugin_memory.py), in name order
    for f in sorted((HERE / "RESULTS.d").glob("*.md")):
        parts += [f.read_text().strip(), ""]
    (HERE / "RESULTS.md").write_text("\n".join(parts) + "\n")


def profile_md(p: dict) -> list[str]:
    wall = p["write_wall"]
    lines = [f"Profile of one cold `rlexport export` (in-process, `bench/profile_export.py`): each stage's time "
             f"summed over the {p['workers']} worker threads and the writer thread, exclusive of nested stages; "
             f"thread-s include waiting (for the disk, a core, the GIL), CPU-s do not.", "",
             "| stage | thread-s | CPU-s |", "|---|---:|---:|"]
    cpu = p.get("stages_cpu", {})
    for k, v in sorted(p["stages"].items(), key=lambda kv: -cpu.get(kv[0], 0)):
        lines.append(f"| {k} | {v:.2f} | {cpu.get(k, 0):.2f} |")
    proc = p.get("process", {})
    disk = proc.get("disk", {})
    lines += ["", f"Process {proc.get('seconds', 0):.2f}s: imports {p['import']:.2f}s, plan {p['plan']:.2f}s, "
                  f"write {wall:.2f}s (the last fsync {p.get('fsync_tail', 0):.2f}s), rest "
                  f"{proc.get('seconds', p['total']) - p['import'] - p['plan'] - wall:.2f}s (commit, interpreter "
                  f"exit); CPU {p['cpu_seconds']:.1f}s (user {p['user']:.1f}, sys {p['sys']:.1f}) = "
                  f"{p['cpu_seconds'] / p['total'] / p['cpus']:.0%} of {p['cpus']} cores over the run; disk busy "
                  f"{disk.get('busy_ms', 0) / 1000:.1f}s (read {disk.get('read_bytes', 0) / 1e9:.2f} GB, wrote "
                  f"{disk.get('write_bytes', 0) / 1e9:.2f} GB). `import rlexport.cli` alone, warm: "
                  f"{p['import_rlexport_cli_warm']:.2f}s.", ""]
    return lines


if __name__ == "__main__":
    main()

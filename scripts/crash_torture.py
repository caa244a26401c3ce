#!/usr/bin/env python
"""Kill `rlexport export` at random moments, many times, and check that --out is never half-written.

    python scripts/crash_torture.py [--runs 100] [--seed 1] [--keep DIR]

Builds a tiny model (tests/factories.py), exports it once for reference, then:
  * SIGKILL after a random delay, --runs times (with --force once --out exists, so replacing a complete
    export is killed too); after each kill --out must be absent or a complete export equal to the reference;
    every 10 kills a run goes to the end and must remove (and report) what the killed runs left;
  * SIGINT and SIGTERM at random moments: exit 130/143 with one message, nothing left behind;
  * two exports (bf16 and fp32) to one --out at once: one wins, the other fails clearly, no mix.
Exports run as real processes forked from a server that imported rlexport once (tests/malformed.py), so the
kills land inside the export rather than inside `import torch`. Exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from malformed import Cli, finish_export, leftovers, stop_export, tensor_digests, why_incomplete  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--signal-runs", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--shard-size", default="100KB")
    ap.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary folder)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = random.Random(a.seed)
    work = a.keep or Path(tempfile.mkdtemp(prefix="rlexport-torture-"))
    work.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []

    from factories import make_tiny_model
    base = work / "base"
    if not base.exists():
        make_tiny_model(base)
    cli = Cli()
    try:
        ref_out = work / "reference"
        shutil.rmtree(ref_out, ignore_errors=True)
        common = ["--max-shard-size", a.shard_size, "-q"]
        times = []
        for _ in range(3):
            t = time.monotonic()
            r = cli.run("export", base, "--out", ref_out, *common, *(["--force"] if ref_out.exists() else []))
            times.append(time.monotonic() - t)
            if r.rc != 0:
                print(r.stderr)
                return 1
        seconds = sorted(times)[1]
        reference = tensor_digests(ref_out)
        print(f"reference export: {len(reference)} tensors in {len(os.listdir(ref_out))} files, "
              f"{seconds * 1000:.0f} ms per export (kills drawn from 0..{seconds * 1200:.0f} ms)")

        # ---- SIGKILL ----
        out = work / "killed" / "out"
        shutil.rmtree(out.parent, ignore_errors=True)
        args = ["export", base, "--out", out, *common]
        landed = collections.Counter()
        cleaned = reported = 0
        for i in range(a.runs):
            s = stop_export(cli, args, out, reference, rng.uniform(0, seconds * 1.2))
            key = ("killed" if s.rc == -9 else f"exit {s.rc}") + f", out {s.out}" + (", temp left" if s.temps else "")
            landed[key] += 1
            if s.out not in ("absent", "complete"):
                failures.append(f"kill {i} after {s.delay * 1000:.0f} ms: --out is {s.out}: {s.problem}")
            if "Traceback" in s.stderr:
                failures.append(f"kill {i}: traceback: {s.stderr[-500:]}")
            if i % 10 == 9:
                r, temps = finish_export(cli, args, out, reference)
                cleaned += len(temps)
                for name in temps:
                    if re.search(rf"removed \S*{re.escape(name)}: the unfinished export", r.stderr):
                        reported += 1
                    else:
                        failures.append(f"run after kill {i}: {name} removed without a message: {r.stderr!r}")
                if r.rc != 0 or leftovers(out) or why_incomplete(out, reference):
                    failures.append(f"run after kill {i}: rc {r.rc}, leftovers {leftovers(out)}, "
                                    f"{why_incomplete(out, reference)}: {r.stderr[-500:]}")
        print(f"\nSIGKILL x {a.runs}:")
        for k, n in sorted(landed.items()):
            print(f"  {n:4d}  {k}")
        print(f"  next runs removed {cleaned} leftover temporary folder(s), {reported} with a message")

        # ---- SIGINT / SIGTERM ----
        for sig in (signal.SIGINT, signal.SIGTERM):
            outcomes = collections.Counter()
            for i in range(a.signal_runs):
                o = work / f"sig{int(sig)}" / f"out{i}"
                shutil.rmtree(o.parent, ignore_errors=True) if i == 0 else None
                s = stop_export(cli, ["export", base, "--out", o, *common], o, reference,
                                0.02 + rng.uniform(0, seconds * 1.2), sig)
                outcomes[f"exit {s.rc}, out {s.out}"] += 1
                last = (s.stderr.strip().splitlines() or [""])[-1]
                ok = (s.rc == 0 and s.out == "complete") or (
                    s.rc == 128 + sig and s.out == "absent" and last.startswith("error[interrupted]: stopped by"))
                if not ok or leftovers(o) or "Traceback" in s.stderr:
                    failures.append(f"{sig.name} {i}: rc {s.rc}, out {s.out}, leftovers {leftovers(o)}: {s.stderr!r}")
            print(f"\n{sig.name} x {a.signal_runs}:")
            for k, n in sorted(outcomes.items()):
                print(f"  {n:4d}  {k}")

        # ---- two at once ----
        refs = {}
        for dt in ("bfloat16", "float32"):
            o = work / f"ref-{dt}"
            shutil.rmtree(o, ignore_errors=True)
            cli.run("export", base, "--out", o, "--dtype", dt, "-q")
            refs[dt] = tensor_digests(o)
        outcomes = collections.Counter()
        for i in range(a.concurrent):
            o = work / "together" / f"out{i}"
            shutil.rmtree(o, ignore_errors=True)
            force = ["--force"] if i % 2 else []
            runs = {dt: cli.start("export", base, "--out", o, "--dtype", dt, *common, *force) for dt in refs}
            res = {dt: cli.wait(r) for dt, r in runs.items()}
            codes = sorted((re.match(r"error\[([^\]]+)\]", r.stderr.strip()) or [None, "ok"])[1]
                           if r.rc else "ok" for r in res.values())
            outcomes[("--force: " if force else "") + " + ".join(codes)] += 1
            winners = [dt for dt, r in res.items() if r.rc == 0]
            digests = tensor_digests(o) if o.exists() else None
            if not winners or digests not in refs.values() or leftovers(o) or (not force and len(winners) != 1) \
                    or any(r.rc not in (0, 2) or "Traceback" in r.stderr for r in res.values()):
                failures.append(f"together {i}: {[(r.rc, r.stderr.strip()) for r in res.values()]}")
        print(f"\ntwo exports to one --out x {a.concurrent}:")
        for k, n in sorted(outcomes.items()):
            print(f"  {n:4d}  {k}")
    finally:
        cli.close()
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    if failures:
        print(f"FAILED ({len(failures)}):")
        for f in failures:
            print("  " + f)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

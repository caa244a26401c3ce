"""verify at any model size (issue 17): `rlexport verify OUT --against CKPT` layer by layer vs whole models.

    python bench/verify_size.py --geometry 7b [--methods layerwise] [--root DIR]

Writes the geometry's base + rank-64 LoRA with gen.py (shared with run.py), exports it once (bf16), then times
each verify method as a whole process (run.py's launcher: wall time, peak RSS from wait4) with `--engine none`
(the engine stage is a vLLM start, the same for both paths). The whole-model path is skipped where its float32
copy of the model cannot fit in memory (it would be killed, or push the machine into swap).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gen  # noqa: E402
import run  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometry", choices=sorted(gen.GEOMETRIES), default="1.5b")
    ap.add_argument("--methods", default="layerwise,whole")
    ap.add_argument("--root", type=Path, default=gen.DEFAULT_ROOT)
    ap.add_argument("--clean", action="store_true", help="delete the export afterwards")
    a = ap.parse_args()
    geo = gen.GEOMETRIES[a.geometry]
    root = a.root / f"verify-{a.geometry}"
    base, adapter = gen.ensure_inputs(a.geometry, a.root, rank=64, targets=gen.LINEAR)  # shared with run.py
    out, logs = root / "out", root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not (out / "config.json").is_file():
        r = run.timed([run.PY, "-m", "rlexport", "export", str(adapter), "--base", str(base), "--out", str(out),
                       "--quiet", "--force"], None, logs / "export.log")
        assert r["rc"] == 0, r.get("error")
    results = {"geometry": geo.name, "model_bytes": geo.nbytes, "float32_bytes": 2 * geo.nbytes,
               "memavailable": run.memavailable(), "methods": {}}
    for method in a.methods.split(","):
        if method == "whole" and 2 * geo.nbytes > 0.8 * run.memavailable():
            results["methods"][method] = {"skipped": f"a float32 copy ({2 * geo.nbytes / 2**30:.1f} GiB) does not "
                                                     f"fit in {run.memavailable() / 2**30:.1f} GiB available"}
            continue
        cmd = [run.PY, "-m", "rlexport", "verify", str(out), "--against", str(adapter), "--base", str(base),
               "--engine", "none", "--json", f"--{'layerwise' if method == 'layerwise' else 'whole-model'}"]
        r = run.timed(cmd, None, logs / f"verify-{method}.log")
        report = (logs / f"verify-{method}.log").read_text()
        try:
            data = json.loads(report[report.index("{"):])
            r["ok"], r["failed"] = data["ok"], data["failed"]
            r["checks"] = {c["name"]: c["summary"] for c in data["checks"] if c["stage"] == "numbers"}
        except ValueError:
            pass
        results["methods"][method] = r
        print(method, json.dumps(r, default=str)[:600], flush=True)
    (HERE / f"verify-{a.geometry}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if a.clean:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

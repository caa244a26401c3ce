"""Drive vLLM in a subprocess: run_jobs(jobs) -> results (see vllm_worker for the job format)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def run_jobs(jobs: list[dict], *, timeout: float = 900) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="rlexport-vllm-") as tmp:
        jobs_file, results_file = Path(tmp) / "jobs.json", Path(tmp) / "results.json"
        jobs_file.write_text(json.dumps(jobs))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        proc = subprocess.run([sys.executable, "-m", "rlexport.engines.vllm_worker", str(jobs_file),
                               str(results_file)], capture_output=True, text=True, timeout=timeout, env=env)
        results = json.loads(results_file.read_text()) if results_file.is_file() else []
        for _ in range(len(jobs) - len(results)):  # the process died mid-job
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"ok": False, "error": f"vLLM worker exited with {proc.returncode}: {tail}"})
        return results

"""No machine-specific path in the repo's text files: scripts and READMEs take arguments, environment variables
($VENV, $SCRATCH, $RLEXPORT_BENCH_ROOT) or repo-relative paths. Binary fixture data (safetensors, torch
distributed .metadata) is not looked at: it records where the trainer ran."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# work, farm, root, home between slashes (built up so that this file does not match itself)
MACHINE = re.compile("/(" + "|".join(("wo" + "rk", "fa" + "rm", "ro" + "ot", "ho" + "me")) + ")/")
TEXT_ROOTS = ("README.md", "pyproject.toml", "bench", "docs", "scripts", "src", "tests")


def repo_files() -> list[Path]:
    """The files git tracks or would track (untracked but not ignored); without git, every file below the roots."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, check=True).stdout.decode().split("\0")
        files = [REPO / n for n in names if n]
    except (OSError, subprocess.CalledProcessError):
        files = [p for r in TEXT_ROOTS for p in ([REPO / r] if (REPO / r).is_file() else (REPO / r).rglob("*"))]
    return [p for p in files if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)]


def test_no_machine_paths():
    found = []
    for path in repo_files():
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (weights, torch .metadata pickles)
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if MACHINE.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not found, "machine paths (use an argument, $VENV/$SCRATCH or a repo-relative path):\n" + "\n".join(found)

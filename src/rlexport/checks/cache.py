"""The facts of a folder (facts.py) without transformers in this process: from a cache, else from a child process
started before the weights are streamed, so that computing them overlaps the writing.

The facts depend only on the small files transformers reads (config.json, the tokenizer files,
generation_config.json) and on transformers' version: the cache key hashes exactly those. A sweep over the
checkpoints of a run, `serve --follow` and the plugin export the same architecture again and again; only the first
export pays for transformers (in the child, in parallel with the copy). The cache holds JSON only, one small file
per key, in $RLEXPORT_CACHE_DIR, else $XDG_CACHE_HOME/rlexport/facts, else ~/.cache/rlexport/facts; a cache that
cannot be written is skipped, never an error.

When transformers is already imported (verify, a library caller, the tests), or the caller asks (a small export,
whose copy is too short to hide a second interpreter's imports: selfcheck.py), the facts are computed in-process. When the child fails for any other reason than the folder itself, the facts are
computed in-process too: a slower export, never an unchecked one.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .facts import TOKENIZER_FILES, Facts

log = logging.getLogger("rlexport")
VERSION = 1  # of the facts' format: part of the key
KEY_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt",
             "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
             *TOKENIZER_FILES)


def transformers_version() -> str | None:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def cache_dir() -> Path:
    if os.environ.get("RLEXPORT_CACHE_DIR"):
        return Path(os.environ["RLEXPORT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlexport" / "facts"


def key(path: Path, version: str) -> str:
    """What the facts depend on: the files transformers reads, by content, and its version."""
    from ..version import __version__
    h = hashlib.sha256(f"{VERSION}\0{__version__}\0{version}\0{sys.version_info[:2]}".encode())
    for name in KEY_FILES:
        p = path / name
        if p.is_file():
            h.update(f"\0{name}\0{p.stat().st_size}\0".encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def load(k: str) -> Facts | None:
    try:
        return Facts.from_json(json.loads((cache_dir() / f"{k}.json").read_text()))
    except (OSError, ValueError, TypeError, KeyError):  # absent, or damaged: compute again
        return None


def save(k: str, facts: Facts) -> None:
    try:
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=d, suffix=".part", delete=False) as f:
            json.dump(facts.to_json(), f)
        os.replace(f.name, d / f"{k}.json")
    except OSError as e:  # read-only home, full disk: the next export computes them again
        log.debug("facts cache not written: %s", e)


class Pending:
    """The facts of one folder: at once from the cache, or from a child process started now; `result()` waits.

    Use as a context manager: leaving it (an export that failed) stops a child still running."""

    def __init__(self, path: Path, *, child: bool = True):
        self.path = Path(path)
        self.version = transformers_version()
        self.facts: Facts | None = None
        self.child: subprocess.Popen | None = None
        if self.version is None:
            return  # no transformers: the checks that need it are skipped, as verify's would be
        self.key = key(self.path, self.version)
        self.facts = load(self.key)
        if self.facts is None and child and "transformers" not in sys.modules:
            self._out = Path(tempfile.mkdtemp(prefix="rlexport-facts-")) / "facts.json"
            # the child gets one thread: it builds a meta model, and the export's own threads need the cores
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            try:
                with open(self._out.with_name("stderr"), "wb") as err:  # a file: a pipe nobody reads could fill up
                    self.child = subprocess.Popen([sys.executable, "-m", "rlexport.checks.facts", str(self.path),
                                                   str(self._out)], stdin=subprocess.DEVNULL,
                                                  stdout=subprocess.DEVNULL, stderr=err, env=env)
            except OSError as e:  # no interpreter to start (embedded Python): computed here by result()
                log.debug("no child process for the facts: %s", e)
                self._clean()

    @property
    def available(self) -> bool:
        """Whether transformers is installed at all (else there are no facts to wait for)."""
        return self.version is not None

    def ready(self) -> Facts | None:
        """The facts if they are known without waiting."""
        return self.facts

    def result(self) -> Facts | None:
        if self.facts is not None or self.version is None:
            return self.facts
        if self.child is not None:
            if self.child.wait() == 0:
                self.facts = Facts.from_json(json.loads(self._out.read_text()))
            else:
                err = self._out.with_name("stderr").read_text(errors="replace").strip().splitlines()
                log.warning("computing the architecture facts in a child process failed (%s); computing them here",
                            err[-1] if err else f"exit status {self.child.returncode}")
            self._clean()
        if self.facts is None:
            from .facts import compute
            self.facts, _ = compute(self.path)
        save(self.key, self.facts)
        return self.facts

    def _clean(self) -> None:
        out, self.child, self._out = getattr(self, "_out", None), None, None
        if out is not None:
            shutil.rmtree(out.parent, ignore_errors=True)

    def __enter__(self) -> Pending:
        return self

    def __exit__(self, *exc) -> None:
        if self.child is not None:
            self.child.kill()
            self.child.wait()
            self._clean()

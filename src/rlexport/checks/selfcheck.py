"""The export's self-check: `verify`'s header-only structure checks, run on the temporary folder before it is
committed.

Headers only: config.json, the safetensors headers (or the plan's tensor list), the tokenizer and
generation_config; no tensor data is read back, so it costs milliseconds whatever the model's size. An export
that vLLM or transformers would refuse (a config.json that disagrees with its tensors, a stray tensor, a
tokenizer larger than the embedding, no eos) fails here and is never committed.

transformers' view of the architecture (its parameters, built on the meta device) and of the tokenizer comes as
data (facts.py) from the cache or from a child process that runs while the weights are written (cache.py): the
export process never imports transformers. With the facts cached the plan is checked in full before any weight is
written; on a first export the checks that need them run on the written headers. Without transformers installed
only the checks rlexport can make alone (config keys against the tensors) run.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import RlexportError
from ..tensors import TensorRef
from .cache import Pending
from .facts import TOKENIZER_FILES
from .processor import check_processor
from .report import Check
from .structure import Folder, check_architecture, check_config_fits, check_dtype, check_files, check_names, \
    check_shapes
from .tokens import check_eos, check_generation_config, check_tokenizer

WITH_FACTS = (check_architecture, check_names, check_shapes, check_dtype)
# Below this many bytes to write, a first export computes the facts in-process: a child's imports (torch and
# transformers again, 3-5 s of CPU) would outlast the copy, and the process stays under 0.5 GiB with them.
CHILD_MIN_BYTES = 512 * 2**20
TOKENIZER_CHECKS = (check_tokenizer, check_generation_config, check_eos)


class SelfCheck:
    """The two checks of one export: `plan(refs)` once config.json and the tokenizer are in `path` (it starts the
    facts), `written()` after the shards and the index. A context manager: leaving it stops a child still running."""

    def __init__(self, path: Path, *, checkpoint=None):
        self.path, self.checkpoint = Path(path), checkpoint
        self.pending: Pending | None = None

    def _facts(self, nbytes: int = 0) -> Pending:
        if self.pending is None:  # reads the small files now: they are written before the weights
            self.pending = Pending(self.path, child=nbytes >= CHILD_MIN_BYTES)
        return self.pending

    def plan(self, refs: list[TensorRef]) -> list[Check]:
        """The plan's tensors against config.json; against the architecture too when its facts are known now."""
        pending = self._facts(sum(r.nbytes for r in refs))
        if pending.child is None:
            pending.result()  # cached, or computed here (a small export): the plan is checked in full
        f = Folder(self.path, headers_only=True, facts_from=lambda f: pending.ready())
        f.config = json.loads((f.path / "config.json").read_text())
        f.refs = {r.name: r for r in refs}
        return self._run(f, [], deep=pending.ready() is not None)

    def written(self) -> list[Check]:
        """What was written, from the headers, against every fact (waiting for them if still being computed)."""
        f = Folder(self.path, headers_only=True, facts_from=lambda f: self._facts().result())
        return self._run(f, [check_files(f, None)], deep=True)

    def _run(self, f: Folder, checks: list[Check], *, deep: bool) -> list[Check]:
        if not any(c.status == "fail" for c in checks):
            checks.append(check_config_fits(f))
        if not any(c.status == "fail" for c in checks):
            checks.append(check_processor(f))  # a vision-language model's processor files, chat template, tower
        if deep and self._facts().available:
            # an export without a tokenizer is allowed (inspect warns: missing-tokenizer); one with a tokenizer
            # must fit
            has_tokenizer = any((f.path / n).is_file() for n in TOKENIZER_FILES)
            for check in WITH_FACTS + (TOKENIZER_CHECKS if has_tokenizer else ()):
                if any(c.status == "fail" for c in checks):
                    break
                checks.append(check(f, None))
        bad = next((c for c in checks if c.status == "fail"), None)
        if bad is not None:
            more = f" ({bad.details[0]})" if bad.details else ""
            raise RlexportError("export-self-check", f"{bad.name}: {bad.summary}{more}; nothing was written",
                                file=self.checkpoint, hint="this is a bug in rlexport or an input it does not "
                                "understand: please report it with the output of `rlexport inspect` on the checkpoint")
        return checks

    def __enter__(self) -> SelfCheck:
        return self

    def __exit__(self, *exc) -> None:
        if self.pending is not None:
            self.pending.__exit__(*exc)


def self_check(path: Path, refs: list[TensorRef] | None = None, *, checkpoint=None) -> list[Check]:
    """Run the header-only structure checks on `path`, every fact included; raise export-self-check on the first
    failure.

    `refs`: the tensors the plan will write (before the shards exist); None reads the written shards' headers.
    `checkpoint`: the input, named in the error (the temporary folder is gone by then).
    """
    with SelfCheck(path, checkpoint=checkpoint) as check:
        if refs is None:
            return check.written()
        check._facts(sum(r.nbytes for r in refs)).result()  # wait: a plan checked on its own is checked in full
        return check.plan(refs)

"""The result of `rlexport verify`: a list of named checks with pass / fail / skip (docs/verify.schema.json)."""
from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA = "rlexport.verify/1"
STATUSES = ("pass", "fail", "skip")
STAGES = ("structure", "numbers", "engine")
# Every check verify can report, in order. Names are stable ids: tests and scripts key on them.
CHECK_NAMES = (
    "files", "architecture", "tensor-names", "tensor-shapes", "dtype", "values", "tokenizer", "generation-config",
    "eos", "chat-template", "tensor-parallel",                # structure
    "weights", "logprobs", "greedy", "scores",                # numbers (--against)
    "engine-load", "engine-parity",                           # engine (--engine)
)


@dataclass
class Check:
    name: str                 # one of CHECK_NAMES
    stage: str                # structure | numbers | engine
    status: str               # pass | fail | skip
    summary: str              # one line: what was found
    details: list[str] = field(default_factory=list)  # the evidence: names, exact engine errors, fixes
    metrics: dict = field(default_factory=dict)       # numbers behind the verdict (max_diff, tolerance, ...)

    def __post_init__(self) -> None:
        if self.name not in CHECK_NAMES or self.stage not in STAGES or self.status not in STATUSES:
            raise ValueError(f"bad check {self.name!r}/{self.stage!r}/{self.status!r}")

    def to_json(self) -> dict:
        return {"name": self.name, "stage": self.stage, "status": self.status, "summary": self.summary,
                "details": list(self.details), "metrics": dict(self.metrics)}


def passed(name: str, stage: str, summary: str, details=(), **metrics) -> Check:
    return Check(name, stage, "pass", summary, list(details), metrics)


def failed(name: str, stage: str, summary: str, details=(), **metrics) -> Check:
    return Check(name, stage, "fail", summary, list(details), metrics)


def skipped(name: str, stage: str, summary: str) -> Check:
    return Check(name, stage, "skip", summary)


@dataclass
class VerifyReport:
    path: str
    target: str | None            # policy | value (from the folder's architecture)
    architecture: str | None
    dtype: str | None             # the folder's weight dtype
    against: str | None
    base: str | None
    engine: str                   # vllm | transformers | none
    checks: list[Check] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == "fail"]

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_json(self) -> dict:
        from .. import __version__
        return {"schema": SCHEMA, "rlexport_version": __version__, "path": self.path, "target": self.target,
                "architecture": self.architecture, "dtype": self.dtype, "against": self.against, "base": self.base,
                "engine": self.engine, "ok": self.ok, "failed": self.failed(),
                "checks": [c.to_json() for c in self.checks], "prompts": self.prompts}

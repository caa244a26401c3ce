"""A named check with pass / fail / skip: what the export's self-check and `rlexport verify` both report.

`verify.report.VerifyReport` collects them (docs/verify.schema.json); the names are stable ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field

STATUSES = ("pass", "fail", "skip")
STAGES = ("structure", "numbers", "engine")
# Every check verify can report, in order. Names are stable ids: tests and scripts key on them.
CHECK_NAMES = (
    "files", "architecture", "tensor-names", "tensor-shapes", "dtype", "values", "tokenizer", "generation-config",
    "eos", "chat-template", "processor", "tensor-parallel",   # structure
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

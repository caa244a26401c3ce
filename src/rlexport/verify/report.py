"""The result of `rlexport verify`: a list of named checks with pass / fail / skip (docs/verify.schema.json)."""
from __future__ import annotations

from dataclasses import dataclass, field

# the checks themselves live below export and verify, in rlexport.checks (both report them)
from ..checks.report import CHECK_NAMES, STAGES, STATUSES, Check, failed, passed, skipped  # noqa: F401

SCHEMA = "rlexport.verify/1"


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
        from ..version import __version__
        return {"schema": SCHEMA, "rlexport_version": __version__, "path": self.path, "target": self.target,
                "architecture": self.architecture, "dtype": self.dtype, "against": self.against, "base": self.base,
                "engine": self.engine, "ok": self.ok, "failed": self.failed(),
                "checks": [c.to_json() for c in self.checks], "prompts": self.prompts}

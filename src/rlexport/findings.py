"""Findings: what is wrong or notable about a checkpoint, with a stable code and the fix."""
from __future__ import annotations

from dataclasses import asdict, dataclass

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    code: str            # stable kebab-case id; tests and scripts key on it, never on the message
    severity: str        # error | warning | info
    message: str         # one sentence: what is the case
    engine: str = ""     # what vLLM / transformers do with the checkpoint as it is
    fix: str = ""        # the command or action that fixes it
    file: str = ""

    def to_json(self) -> dict:
        return asdict(self)

"""The one error type rlexport raises for bad input; the CLI prints it on one line."""
from __future__ import annotations

from pathlib import Path


class RlexportError(Exception):
    """A problem with the user's input or environment, with a stable code and the fix.

    Bugs are not RlexportErrors: they keep their traceback.
    """

    def __init__(self, code: str, message: str, *, file: str | Path | None = None, hint: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.file = str(file) if file is not None else None
        self.hint = hint

    def line(self) -> str:
        where = f" ({self.file})" if self.file else ""
        fix = f": {self.hint}" if self.hint else ""
        return f"error[{self.code}]: {self.message}{where}{fix}"

    def __str__(self) -> str:
        return self.line()

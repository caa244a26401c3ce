"""rlexport: RLHF checkpoints -> Hugging Face folders that vLLM serves, streamed, atomic, verified.

The public functions are imported on first use: `import rlexport.cli` does not import torch (2-4 s), so
`--help` answers at once and the CLI's signal handlers are in place before the heavy imports start.
"""
from __future__ import annotations

import importlib
import sys
import types

from .version import __version__

_API = {"export": ".export", "inspect": ".diagnosis", "open_checkpoint": ".formats", "verify": ".verify",
        "RlexportError": ".errors", "vllm_args": ".engines.serving"}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'rlexport' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name], __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodules rlexport.export / rlexport.verify binds them as attributes of the package,
        # which would hide the functions of the same names: keep the functions.
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

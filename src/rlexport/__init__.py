"""rlexport: RLHF checkpoints -> Hugging Face folders that vLLM serves, streamed, atomic, verified."""
from __future__ import annotations

__version__ = "0.1.0"

from .diagnosis import inspect  # noqa: E402
from .errors import RlexportError  # noqa: E402
from .export import export  # noqa: E402
from .formats import open_checkpoint  # noqa: E402
from .verify import verify  # noqa: E402

__all__ = ["export", "inspect", "open_checkpoint", "verify", "RlexportError", "__version__"]
